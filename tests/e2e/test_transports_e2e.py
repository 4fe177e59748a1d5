"""`distserve up` (tiny-llama, 1 prefill + 1 decode) forced onto each KV transport: greedy output is
token-identical to transformers' generate, each request's metadata names the transport, and the
decode worker's metrics count its bytes there with no fallback."""

from __future__ import annotations

import random
import urllib.request

import pytest
import torch

from distserve.client import Client
from distserve.kv import mooncake_transport
from distserve.up import UpProcess

pytestmark = pytest.mark.timeout(300)

MOONCAKE_OK, MOONCAKE_WHY = mooncake_transport.status()


def reference(lm, prompt, n):
    ids = torch.tensor([prompt])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("transport", [
    "grpc", "gloo", "shm",
    pytest.param("mooncake", marks=pytest.mark.skipif(not MOONCAKE_OK, reason=f"mooncake wheel unusable here: {MOONCAKE_WHY}")),
])
@pytest.mark.parametrize("wire", ["auto"])
def test_each_transport_end_to_end_matches_transformers(transport, wire, tiny, tmp_path, dump_on_failure):
    up = UpProcess(tmp_path, "--model", "tiny-llama", "--prefill", "1", "--decode", "1", "--worker-arg=--num-blocks=256",
                   f"--worker-arg=--kv-transport={transport}", f"--worker-arg=--kv-wire-dtype={wire}")
    dump_on_failure(up)
    try:
        rng = random.Random(5)
        reqs = [([rng.randrange(3, 259) for _ in range(rng.randrange(5, 150))], rng.randrange(2, 20)) for _ in range(6)]
        with Client(up.target, **up.client_tls) as c:
            outs = [c.generate(p, max_tokens=n, temperature=0.0, ignore_eos=True) for p, n in reqs]
        for (p, n), out in zip(reqs, outs):
            assert out.token_ids == reference(tiny, p, n)
            assert out.metrics.kv_transport == transport
            c = tiny.model.config  # fp32 KV: layers x (K, V) x kv heads x head dim x 4 bytes per token
            assert out.metrics.kv_bytes == len(p) * c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
        metrics = _decode_metrics(up)
        assert f'distserve_kv_transfer_bytes_total{{transport="{transport}"}}' in metrics
        assert "distserve_kv_transport_fallbacks_total{" not in metrics  # never fell back
    finally:
        assert up.stop() == 0


def _decode_metrics(up: UpProcess) -> str:
    import re

    log = (up.logs / "decode-1.log").read_text(errors="replace")
    port = re.search(r"READY decode \S+ metrics=(\d+)", log).group(1)
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
