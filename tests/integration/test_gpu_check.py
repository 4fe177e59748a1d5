"""benchmarks/gpu_check.py (issue 19's GPU check) end to end on the CPU, in its --small form: every
part runs (engine against transformers, `distserve up` with KV moving between two workers, `distserve
profile`) and its figures land in the output folder; a failing part and a part past its share of the
deadline are recorded as such while the run goes on."""

import json
import subprocess
import sys
from pathlib import Path

from distserve.planner.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(out: Path, *args: str, timeout: float = 170) -> tuple[int, dict, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    doc = json.loads((out / "gpu_check.json").read_text())
    return proc.returncode, doc, proc.stderr + log[-6000:]


def test_every_part_runs_and_reports(tmp_path):
    out = tmp_path / "out"
    rc, doc, log = _run(out)
    parts = doc["parts"]
    assert {p: e["status"] for p, e in parts.items()} == {"engine": "ok", "up": "ok", "profile": "ok"}, log
    assert rc == 0, log

    eng = parts["engine"]["figures"]
    assert eng["device"]["device"] == "cpu"
    for dt in ("float32", "bfloat16"):
        g = eng[f"greedy_{dt}"]
        assert g["model"] == "tiny-llama" and g["prompts"] == 4 and len(g["first_divergence"]) == 4
    assert eng["greedy_float32"]["identical"] == 4, eng["greedy_float32"]  # fp32: token for token
    for key in ("throughput_small", "throughput_big"):
        t = eng[key]
        assert [r["batch"] for r in t["prefill"]] == [1, 4] and [r["batch"] for r in t["decode"]] == [1, 4]
        assert all(r["tok_s"] > 0 for r in t["prefill"] + t["decode"])

    up = parts["up"]["figures"]
    suite = up["suite_auto"]
    assert suite["ran"] in ("shm", "gloo", "grpc") and up["summary"]["ran"] == [suite["ran"]]
    assert suite["kv_bytes_per_request"] > 0 and suite["kv_gb_per_s"] > 0
    assert 0 < suite["kv_transfer_share_mean"] < 1
    assert suite["stream"]["streamed"] and suite["stream"]["tokens"] == 4
    assert up["redis"]["redis_server"]

    prof = parts["profile"]["figures"]["profile"]
    assert prof["device"] == "cpu" and prof["engines"][0]["weights"] == "fp32"
    assert load_profile(out / prof["file"]).model.name == "tiny-llama"

    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(doc["files"]) and len(files) <= 8 and all((out / f).is_file() for f in files)


def test_a_failing_part_and_a_late_part_are_recorded(tmp_path):
    out = tmp_path / "out"
    rc, doc, log = _run(out, "--parts", "engine,profile", "--big-model", "random:no-such-shape", "--deadline-s", "40",
                        timeout=90)
    assert rc == 1
    eng = doc["parts"]["engine"]
    assert eng["status"] == "error" and "unknown random model" in eng["error"], log
    assert eng["figures"]["greedy_float32"]["identical"] == 4  # what ran before the failure is kept
    assert doc["parts"]["profile"]["status"] == "error"  # the same bad model: profile fails too, and is recorded

    out2 = tmp_path / "late"
    rc, doc, log = _run(out2, "--parts", "profile", "--deadline-s", "2", timeout=60)
    assert rc == 1 and doc["parts"]["profile"]["status"] == "timeout", log
