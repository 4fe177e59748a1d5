"""`distserve profile --quick` on tiny-llama (a real measurement and fit, a few seconds), then `distserve plan`,
`plan simulate` and `plan reference` against it, in-process through the CLI's own entry point."""

import json
from pathlib import Path

import pytest

from distserve.cli import main
from distserve.planner.commands import DEFAULT_REFERENCE
from distserve.planner.profile import load_profile


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "tiny.json"
    main(["profile", "--model", "tiny-llama", "--quick", "--threads", "1", "--weights", "fp32,int8", "--out", str(out)])
    return out


def test_profile_names_the_machine_and_fits_each_configuration(tiny_profile):
    d = json.loads(tiny_profile.read_text())
    assert d["kind"] == "distserve-profile" and d["device"] == "cpu"
    m = d["machine"]
    assert m["cpu"] and m["cores"] >= 1 and isinstance(m["flags"], list)
    assert "loadavg_before" in m and m["torch"]
    assert {(e["threads"], e["weights"]) for e in d["engines"]} == {(1, "fp32"), (1, "int8")}
    for e in d["engines"]:
        for phase in ("prefill", "decode", "mixed"):
            f = e["fit"][phase]
            assert f["points"] >= 2 and 0 <= f["mean_rel_err"] <= f["max_rel_err"]
        assert all(c >= 0 for c in e["step"]["prefill"] + e["step"]["decode"])
    assert set(d["transfer"]) == {"shm", "grpc"} and d["default_transport"] == "shm"
    assert d["points"]["threads=1,weights=fp32"]["prefill"]
    p = load_profile(tiny_profile)
    assert p.model.name == "tiny-llama" and p.model.num_layers == 4
    assert p.engine(1, "int8").step.prefill_s([(0, 100)]) > 0


def test_plan_prints_a_ranked_table_and_the_best_up_command(tiny_profile, capsys):
    main(["plan", "--profile", str(tiny_profile), "--cores", "2", "--workload", "chat", "--num-requests", "40",
          "--slo-ttft", "0.5", "--slo-tpot", "0.05"])
    out = capsys.readouterr().out
    assert "1P+1D x1t" in out and "2C x1t" in out
    assert "best: distserve up --model tiny-llama" in out
    main(["plan", "--profile", str(tiny_profile), "--cores", "2", "--num-requests", "40", "--slo-ttft", "0.5", "--slo-tpot", "0.05",
          "--weights", "fp32", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["ranked"] and all("fp32" in r["placement"] for r in doc["ranked"])
    assert doc["ranked"][0]["command"].startswith("distserve up")


def test_plan_simulate_writes_bench_serve_records(tiny_profile, tmp_path, capsys):
    out = tmp_path / "sim.json"
    main(["plan", "simulate", "--profile", str(tiny_profile), "--placement", "1p1d", "--weights", "fp32", "--workload", "code",
          "--rate", "2", "--num-requests", "12", "--slo-ttft", "1", "--slo-tpot", "0.1", "--per-request", "--out", str(out)])
    text = capsys.readouterr().out
    assert "SLO attainment" in text and "TTFT ms" in text
    doc = json.loads(out.read_text())
    assert doc["summary"]["requests"] == 12 and len(doc["requests"]) == 12
    # the bench's trace loader reads it back: a simulated run replays like a measured one
    main(["plan", "simulate", "--profile", str(tiny_profile), "--placement", "2c", "--weights", "fp32", "--trace", str(out),
          "--slo-ttft", "1", "--slo-tpot", "0.1"])
    assert "the trace's own measurements against the simulation" in capsys.readouterr().out


@pytest.mark.skipif(not (Path(DEFAULT_REFERENCE) / "runs").exists(), reason="no reference data beside the repository")
def test_plan_reference_replays_a_real_run(capsys):
    main(["plan", "reference", "--only", "c21d11-300-3", "--json"])
    doc = json.loads(capsys.readouterr().out)
    (run,) = doc["runs"]
    assert run["placement"] == "c21d11" and abs(run["error_points"]) <= 10
    assert run["real"]["attainment"] == pytest.approx(0.96, abs=0.01)


def test_reference_prefill_factor_scales_the_prefill_coefficients_only():
    from distserve.planner.profile import from_reference
    from distserve.planner.reference import with_overheads

    coef = {"facebook/opt-13b": {"1": {"prefill": [10.0, 0.1, 1e-5], "decoding_smallbs": [5.0, 0.02, 1e-4],
                              "decoding_largebs": [6.0, 0.02, 1e-4], "decoding_large_small_bs_threshold": 95}}}
    base = from_reference(coef, "facebook/opt-13b")
    p = with_overheads(base, 0.002, 0.0001, 0.8)
    (e,), (b,) = p.engines, base.engines
    assert e.step.prefill == pytest.approx(tuple(0.8 * c for c in b.step.prefill))
    assert e.step.decode == b.step.decode and e.step.decode_large == b.step.decode_large
    assert (p.costs.step_s, p.costs.seq_s) == (0.002, 0.0001)
    assert with_overheads(base, 0.0, 0.0).engines[0].step == b.step  # the default factor leaves it alone
