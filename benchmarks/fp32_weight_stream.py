"""An fp32 linear at decode batch size with its weight in cache against the same shape streamed from
memory, as a decode step reads every weight once (docs/kernels.md, "Where fp32 decode's time goes").

    python benchmarks/fp32_weight_stream.py [--batch 16] [--threads 2]

Prints, per shape of smollm2-135m's layers: us per call with one weight called again and again (it
stays in cache) and with 60 different weights called in turn (hundreds of MB, from DRAM).
"""

import argparse
import time

import torch

from distserve.engine.model_runner import _Linear

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)}


def per_call(linears: list, x: torch.Tensor, calls: int) -> float:
    for lin in linears:
        lin(x)
    calls = max(1, calls // len(linears)) * len(linears)
    t = time.perf_counter()
    for i in range(calls):
        linears[i % len(linears)](x)
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streamed", type=int, default=60, help="distinct weights called in turn")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, (k, n) in SHAPES.items():
        x = torch.randn(args.batch, k)
        cached = per_call([_Linear(torch.randn(n, k) * 0.02)], x, 600)
        streamed = per_call([_Linear(torch.randn(n, k) * 0.02) for _ in range(args.streamed)], x, 600)
        mb = args.streamed * n * k * 4 / 1e6
        print(f"{name:8} {k}->{n}: in cache {cached * 1e6:6.0f} us ({2 * args.batch * n * k / cached / 1e9:4.0f} GFLOP/s), "
              f"streamed ({mb:.0f} MB) {streamed * 1e6:6.0f} us ({n * k * 4 / streamed / 1e9:4.1f} GB/s of weights)")


if __name__ == "__main__":
    main()
