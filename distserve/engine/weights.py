"""The weights the model runner reads: fused per layer, fp32 or int8, in memory or mapped read-only.

Names (one flat dict; `{L}` = `layers.{i}`):

  embed                 token embedding [vocab, hidden]; also the output head when `tied`
  lm_head               output head [vocab, hidden] (absent when tied)
  norm                  final RMSNorm weight
  {L}.ln1 / {L}.ln2     RMSNorm weights before attention / before the MLP
  {L}.qkv               q, k and v projections concatenated [(heads + 2 kv_heads) * head_dim, hidden]
  {L}.o                 output projection
  {L}.gate_up           gate and up projections concatenated [2 * ffn, hidden]
  {L}.down              down projection
  X.bias                a projection's bias, where the model has one

In format "fp32" a matrix X is one tensor `X` of the model's dtype; in format "int8" it is
`X.codes` (int8), `X.scale` and `X.offset` (fp32 per group of `quant.GROUP` inputs), in the blocked
layout of `quant.QuantizedWeight`, its output width in the file metadata ("n_out"). Norms and biases
stay fp32 in both.

Files: `runner_file(loaded, fmt)` = `<model cache dir>/distserve-<fmt>.safetensors`, written once by
`ensure_file` (under a file lock, atomically, stamped with the format version and a fingerprint of
the source checkpoint, rebuilt when either changes). `map_file` reads it through one read-only
shared memory map (PROT_READ): every worker on the host that maps the same file shares the same
physical pages, and a write through a mapped tensor faults (SIGSEGV) instead of reaching another
worker's weights or the file.

Lifecycle: the engine calls `load(loaded, fmt, share)` once at start. fp32 without sharing builds
from the in-memory model (the runner then packs private oneDNN copies); everything else goes through
the file: mapped as is (`share`), or copied into private memory.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import warnings
from pathlib import Path

import torch

from distserve.engine import quant

log = logging.getLogger(__name__)

FORMATS = ("fp32", "int8")
FILE_VERSION = "1"
LINEARS = ("qkv", "o", "gate_up", "down")

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64}


class ModelWeights:
    """A flat dict of named tensors in one format, plus where they came from."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], *, tied: bool, num_layers: int,
                 n_out: dict[str, int] | None = None, path: Path | None = None, mapped: bool = False,
                 buffer: mmap.mmap | None = None):
        if fmt not in FORMATS:
            raise ValueError(f"weights format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.tensors = tensors
        self.tied = tied  # the output head is the embedding
        self.num_layers = num_layers
        self.n_out = dict(n_out or {})  # int8 matrices: output width (the stored rows are padded)
        self.path = path  # the file they were read from, if any
        self.mapped = mapped  # tensors point into a read-only shared map of `path`
        self._buffer = buffer  # keeps the map alive (tensors also reference it)

    # -- access ------------------------------------------------------------------------------
    def matrix(self, name: str) -> torch.Tensor | quant.QuantizedWeight:
        if name in self.tensors:
            return self.tensors[name]
        t = self.tensors
        return quant.QuantizedWeight(t[f"{name}.codes"], t[f"{name}.scale"], t[f"{name}.offset"], self.n_out[name])

    def bias(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"{name}.bias")

    def head_name(self) -> str:
        return "embed" if self.tied else "lm_head"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def replace(self, fn) -> "ModelWeights":
        """The same weights with every tensor passed through fn, in private memory."""
        return ModelWeights(self.fmt, {k: fn(v) for k, v in self.tensors.items()}, tied=self.tied,
                            num_layers=self.num_layers, n_out=self.n_out, path=self.path)

    def private_copy(self) -> "ModelWeights":
        """The same weights in this process's own memory (no map)."""
        return self.replace(lambda t: t.clone())

    def to(self, device: torch.device) -> "ModelWeights":
        return self if device.type == "cpu" else self.replace(lambda t: t.to(device))


# ---------------------------------------------------------------------------------------------
# from an in-memory transformers model


def _is_tied(model: torch.nn.Module) -> bool:
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    return head is embed or (head.data_ptr() == embed.data_ptr() and head.shape == embed.shape)


@torch.no_grad()
def from_model(model: torch.nn.Module, fmt: str = "fp32") -> ModelWeights:
    """Fused runner weights from a Llama-family transformers model (int8: quantised here)."""
    if fmt not in FORMATS:
        raise ValueError(f"weights format must be one of {FORMATS}, got {fmt!r}")
    inner = model.model
    t: dict[str, torch.Tensor] = {}
    n_out: dict[str, int] = {}

    def put_matrix(name: str, w: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = w.detach()
        if fmt == "int8" and quant.can_quantize(w):
            q = quant.quantize_weight(w)
            t[f"{name}.codes"], t[f"{name}.scale"], t[f"{name}.offset"] = q.codes, q.scale, q.offset
            n_out[name] = q.n_out
        else:
            t[name] = w
        if bias is not None:
            t[f"{name}.bias"] = bias.detach().float() if fmt == "int8" else bias.detach()

    def cat_bias(*mods) -> torch.Tensor | None:
        biases = [m.bias for m in mods]
        return torch.cat(biases) if all(b is not None for b in biases) else None

    put_matrix("embed", inner.embed_tokens.weight)
    tied = _is_tied(model)
    if not tied:
        put_matrix("lm_head", model.lm_head.weight, getattr(model.lm_head, "bias", None))
    t["norm"] = inner.norm.weight.detach()
    for i, layer in enumerate(inner.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"layers.{i}"
        t[f"{p}.ln1"] = layer.input_layernorm.weight.detach()
        t[f"{p}.ln2"] = layer.post_attention_layernorm.weight.detach()
        qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
        put_matrix(f"{p}.qkv", torch.cat([m.weight for m in qkv]), cat_bias(*qkv))
        put_matrix(f"{p}.o", attn.o_proj.weight, attn.o_proj.bias)
        put_matrix(f"{p}.gate_up", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), cat_bias(mlp.gate_proj, mlp.up_proj))
        put_matrix(f"{p}.down", mlp.down_proj.weight, mlp.down_proj.bias)
    if fmt == "int8":
        t = {k: (v.float() if v.is_floating_point() else v) for k, v in t.items()}
    return ModelWeights(fmt, t, tied=tied, num_layers=len(inner.layers), n_out=n_out)


# ---------------------------------------------------------------------------------------------
# the file: safetensors, mapped read-only


def save(weights: ModelWeights, path: Path, fingerprint: str) -> None:
    """Writes the weights as safetensors (atomically: a temporary file renamed into place)."""
    from safetensors.torch import save_file

    meta = {"format": weights.fmt, "version": FILE_VERSION, "fingerprint": fingerprint,
            "tied": str(weights.tied), "num_layers": str(weights.num_layers), "group": str(quant.GROUP),
            "block": str(quant.BLOCK), "n_out": json.dumps(weights.n_out, sort_keys=True)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.tensors.items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (tensor entries and __metadata__) and where the data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def map_file(path: Path) -> ModelWeights:
    """Every tensor of a runner file as a view of one read-only shared memory map of it."""
    header, start = read_header(path)
    meta = header.pop("__metadata__", {})
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        # 2 MiB mappings where the kernel can (file pages read in as large folios): a decode step
        # streams every weight, and with 4 KiB pages the int8 kernel waits on TLB misses (~10% of a step)
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": that is the point
        for name, e in header.items():
            dtype = _ST_DTYPES[e["dtype"]]
            a, b = e["data_offsets"]
            itemsize = torch.empty((), dtype=dtype).element_size()
            if (start + a) % itemsize:
                raise ValueError(f"{path}: tensor {name} is not aligned for {dtype}")
            count = (b - a) // itemsize
            flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=start + a) if count else torch.empty(0, dtype=dtype)
            tensors[name] = flat.view(e["shape"])
    return ModelWeights(meta["format"], tensors, tied=meta.get("tied") == "True", num_layers=int(meta["num_layers"]),
                        n_out=json.loads(meta.get("n_out", "{}")), path=path, mapped=True, buffer=buf)


# ---------------------------------------------------------------------------------------------
# the cache next to the model


def runner_file(loaded, fmt: str) -> Path:
    return Path(loaded.cache_dir) / f"distserve-{fmt}.safetensors"


def _file_is_current(path: Path, fmt: str, fingerprint: str) -> bool:
    if not path.exists():
        return False
    try:
        meta = read_header(path)[0].get("__metadata__", {})
    except (OSError, ValueError):
        return False
    return (meta.get("format"), meta.get("version"), meta.get("fingerprint"), meta.get("group"), meta.get("block")) == (
        fmt, FILE_VERSION, fingerprint, str(quant.GROUP), str(quant.BLOCK))


def ensure_file(loaded, fmt: str) -> Path:
    """The runner file of this model and format, written first if it is missing or stale."""
    from filelock import FileLock

    path = runner_file(loaded, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if _file_is_current(path, fmt, loaded.fingerprint):
        return path
    with FileLock(str(path) + ".lock"):
        if _file_is_current(path, fmt, loaded.fingerprint):
            return path
        model = loaded.model if loaded.has_weights() and loaded.device.type == "cpu" else loaded.reload_model()
        log.info("writing %s weights of %s to %s (once)", fmt, loaded.name, path)
        w = from_model(model, fmt).replace(lambda t: t.float() if t.is_floating_point() else t)  # files hold fp32
        save(w, path, loaded.fingerprint)
    return path


def resolve_format(choice: str, loaded) -> str:
    """"auto" -> the default for this model and device: int8 on CPU for a real checkpoint (faster at
    the same greedy tokens, docs/quantization.md), fp32 on CUDA and for tiny-llama (whose job is to
    match transformers token for token)."""
    if choice != "auto":
        return choice
    return "int8" if loaded.device.type == "cpu" and loaded.source_dir is not None else "fp32"


def load(loaded, fmt: str = "fp32", share: bool = False) -> ModelWeights:
    """The runner's weights for an engine (see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"weights format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "fp32" and not share:
        return from_model(loaded.ensure_weights(), "fp32")
    path = ensure_file(loaded, fmt)
    w = map_file(path)
    if fmt == "fp32" and loaded.dtype != torch.float32:  # e.g. bfloat16 on CUDA
        w = w.replace(lambda t: t.to(loaded.dtype) if t.is_floating_point() else t)
    if loaded.device.type != "cpu":
        return w.to(loaded.device)
    return w if share else w.private_copy()
