"""Runner weight files: written once next to the model, mapped read-only and shared, rebuilt when
stale; a write through a mapped weight kills the writer and reaches neither the file nor another
process mapping it."""

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from distserve.engine import weights
from distserve.engine.engine import EngineConfig, LLMEngine
from distserve.engine.models import load_model
from distserve.engine.sampling import SamplingParams

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private DISTSERVE_HOME whose kernels folder is the real one (no recompiling)."""
    from distserve.models import home as real_home

    kernels = real_home() / "kernels"
    monkeypatch.setenv("DISTSERVE_HOME", str(tmp_path))
    kernels.mkdir(parents=True, exist_ok=True)
    (tmp_path / "kernels").symlink_to(kernels)
    return tmp_path


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def generate(engine, prompt=(5, 6, 7, 8, 9), n=12):
    engine.add_request("a", list(prompt), SamplingParams(max_tokens=n, temperature=0.0))
    toks = []
    while engine.has_work():
        for o in engine.step():
            toks += o.new_token_ids
    return toks


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_file_is_written_once_mapped_read_only_and_gives_the_same_tokens(home, fmt):
    lm = load_model("tiny-llama", device="cpu")
    shared = LLMEngine(lm, EngineConfig(num_blocks=32, weights=fmt, share_weights=True))
    path = weights.runner_file(lm, fmt)
    assert path.exists() and path.parent == home / "models" / "tiny-llama-seed0"
    stamp = path.stat().st_mtime_ns
    private = LLMEngine(lm, EngineConfig(num_blocks=32, weights=fmt, share_weights=False))
    again = LLMEngine(lm, EngineConfig(num_blocks=32, weights=fmt, share_weights=True))
    assert path.stat().st_mtime_ns == stamp  # not re-quantised or rewritten
    assert again.runner.weights.mapped
    w = shared.runner.weights
    assert w.mapped and not private.runner.weights.mapped
    assert generate(private) == generate(shared)
    # the runner's linears read the map itself, no private packed copy
    mapped = {t.untyped_storage().data_ptr() for t in w.tensors.values()}
    for layer in shared.runner.layers:
        lin = layer.qkv
        data = lin.q.codes if fmt == "int8" else lin.weight
        assert data.untyped_storage().data_ptr() in mapped
        assert getattr(lin, "packed", None) is None


def test_a_stale_file_is_rebuilt(home):
    lm = load_model("tiny-llama", device="cpu")
    path = weights.ensure_file(lm, "int8")
    before = {k: v.clone() for k, v in weights.map_file(path).tensors.items()}
    stamp = path.stat().st_mtime_ns
    lm.fingerprint = "another checkpoint"
    weights.ensure_file(lm, "int8")
    assert path.stat().st_mtime_ns != stamp
    assert weights.read_header(path)[0]["__metadata__"]["fingerprint"] == "another checkpoint"
    after = weights.map_file(path).tensors
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_worker_frees_its_transformers_copy(home):
    lm = load_model("tiny-llama", device="cpu")
    eng = LLMEngine(lm, EngineConfig(num_blocks=32, weights="int8", share_weights=True, free_model_weights=True))
    assert not lm.has_weights()
    assert len(generate(eng)) == 12


def test_a_write_through_mapped_weights_kills_the_writer_and_corrupts_nothing(home):
    lm = load_model("tiny-llama", device="cpu")
    path = weights.ensure_file(lm, "int8")
    before = sha(path)
    mine = weights.map_file(path)
    codes = mine.tensors["layers.0.qkv.codes"]
    snapshot = codes.clone()
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from distserve.engine import weights
        w = weights.map_file(Path({str(path)!r}))
        t = w.tensors["layers.0.qkv.codes"]
        print("mapped", flush=True)
        t.add_(1)  # a stray in-place update of a shared weight
        print("wrote", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DISTSERVE_HOME": str(home)})
    assert "mapped" in proc.stdout and "wrote" not in proc.stdout
    assert proc.returncode == -signal.SIGSEGV, proc.stderr[-2000:]
    assert torch.equal(codes, snapshot)  # this process's view of the same pages
    assert sha(path) == before
