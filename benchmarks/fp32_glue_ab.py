"""fp32 decode with the native layer glue (add_rms_norm, silu_mul) against the same operations in torch,
interleaved in one process (docs/kernels.md, "Where fp32 decode's time goes").

    python benchmarks/fp32_glue_ab.py [--rounds 3] [--batch 16] [--context 256]

Each round builds two fp32 decode engines on the same weights; the second's kernel module answers
add_rms_norm and silu_mul with torch operations. bench engine's interleaved_decode steps them in
alternating rounds and prints decode tok/s for each.
"""

import argparse

import torch
import torch.nn.functional as F

from distserve.bench.engine_bench import decode_engine, interleaved_decode
from distserve.engine.models import load_model


class TorchGlue:
    """The paged_attention module, with the layer glue done by torch operations."""

    def __init__(self, native):
        self.native = native

    def __getattr__(self, name):
        return getattr(self.native, name)

    @staticmethod
    def add_rms_norm(h, x, w, eps):
        if x is not None:
            h.add_(x)
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))

    @staticmethod
    def silu_mul(gu):
        m = gu.shape[-1] // 2
        return F.silu(gu[:, :m]) * gu[:, m:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    lm = load_model(a.model)
    for _ in range(a.rounds):
        native = decode_engine(lm, a.batch, a.context, a.steps)
        plain = decode_engine(lm, a.batch, a.context, a.steps)
        if native.runner.kernel is None:
            raise SystemExit("no native kernels here (DISTSERVE_KERNELS=0 or no compiler): nothing to compare")
        plain.runner.kernel = TorchGlue(plain.runner.kernel)
        rates = interleaved_decode({"native glue": native, "torch glue": plain}, a.batch, a.steps)
        print({name: round(tok_s, 1) for name, (tok_s, _) in rates.items()}, flush=True)


if __name__ == "__main__":
    main()
