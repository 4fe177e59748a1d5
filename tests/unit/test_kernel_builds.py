"""How the native kernels are built, found and chosen (distserve/engine/kernels): the CPU class from
/proc/cpuinfo flags, the content-keyed cache, the build lock and its recovery from a killed builder,
the torch fallback's gauge and warning, and an ahead-of-time build used by a process with no compiler.

Only the last test compiles real kernels (marked kernel_build; `distserve kernels build` into pytest's
cache folder, so later runs find them built); the lock tests stand a file write in for the compiler.
"""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from distserve.engine import kernels
from distserve.engine.kernels import cache
from distserve.engine.kernels.cache import Spec
from distserve.engine.kernels.variants import NATIVE, by_name, cpu_flags, supported
from distserve.metrics import Metrics

KERNELS_DIR = Path(kernels.__file__).parent
V2 = "fpu sse sse2 pni ssse3 cx16 sse4_1 sse4_2 popcnt lahf_lm"
V3 = V2 + " avx avx2 fma bmi1 bmi2 f16c abm movbe xsave"
CPUS = {  # a /proc/cpuinfo flags line per CPU, and the build it runs
    "Zen 4 / Ice Lake (AVX-512 with VNNI)": (V3 + " avx512f avx512bw avx512cd avx512dq avx512vl avx512_vnni avx512_bf16", "avx512vnni"),
    "Skylake-SP (AVX-512, no VNNI)": (V3 + " avx512f avx512bw avx512cd avx512dq avx512vl", "avx2"),
    "Zen 2 (AVX2)": (V3 + " sha_ni", "avx2"),
    "Haswell without BMI2 exposed by a hypervisor": (V3.replace(" bmi2", ""), "generic"),
    "Nehalem (SSE4.2)": (V2, "generic"),
    "Core 2 (below x86-64-v2)": ("fpu sse sse2 pni ssse3 cx16 sse4_1 lahf_lm", "native"),
}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private DISTSERVE_HOME, no prebuilt folder, no forced variant, and an empty status table."""
    monkeypatch.setenv("DISTSERVE_HOME", str(tmp_path / "home"))
    for var in ("DISTSERVE_KERNELS_DIR", "DISTSERVE_KERNEL_VARIANT", "DISTSERVE_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(kernels, "_status", {})
    return tmp_path


@pytest.fixture
def no_compiler_needed(monkeypatch):
    """$CXX --version answers (it keys the build directory) without a C++ compiler being there."""
    monkeypatch.setenv("CXX", sys.executable)


def fake_compile(seconds: float = 0.0):
    def compile(spec: Spec, out: Path) -> None:
        time.sleep(seconds)
        out.write_bytes(b"not really a shared object")
    return compile


# -- the CPU class --------------------------------------------------------------------------------
@pytest.mark.parametrize("cpu", sorted(CPUS))
def test_each_cpu_runs_the_best_class_its_flags_allow(cpu, isolated):
    flags, want = CPUS[cpu]
    assert kernels.candidates(cpu_flags(f"processor\t: 0\nflags\t\t: {flags}\n"), "x86_64")[0].name == want


def test_arm64_gets_the_generic_build_for_the_compilers_default_target(isolated):
    (v,) = kernels.candidates(cpu_flags("Features\t: fp asimd evtstrm aes crc32\n"), "aarch64")
    assert v.name == "generic" and v.cflags == ()


def test_a_forced_variant_is_taken_only_where_the_cpu_runs_it(isolated, monkeypatch, caplog):
    avx512, zen2 = cpu_flags("flags: " + CPUS["Zen 4 / Ice Lake (AVX-512 with VNNI)"][0]), cpu_flags("flags: " + CPUS["Zen 2 (AVX2)"][0])
    monkeypatch.setenv("DISTSERVE_KERNEL_VARIANT", "avx2")
    assert [v.name for v in kernels.candidates(avx512, "x86_64")] == ["avx2"]
    monkeypatch.setenv("DISTSERVE_KERNEL_VARIANT", "native")
    assert kernels.candidates(zen2, "x86_64") == (NATIVE,)
    monkeypatch.setenv("DISTSERVE_KERNEL_VARIANT", "avx512vnni")
    with caplog.at_level(logging.WARNING):
        assert [v.name for v in kernels.candidates(zen2, "x86_64")] == ["avx2", "generic"]
    assert "this CPU lacks" in caplog.text and "avx512_vnni" in caplog.text
    with pytest.raises(ValueError, match="avx512vnni, avx2, generic, native"):
        by_name("skylake", "x86_64")


def fake_built(root: Path, spec: Spec) -> Path:
    """A finished build directory as `distserve kernels build` leaves it (the .so is a stand-in)."""
    d = root / spec.kernel / f"{spec.variant.name}-0123456789abcdef"
    d.mkdir(parents=True)
    (d / f"{spec.module}.so").write_bytes(b"")
    (d / "build.json").write_text(json.dumps(dict(module=spec.module, file=f"{spec.module}.so", inputs=spec.inputs())))
    return d


def test_the_best_built_class_is_chosen_and_a_missing_one_is_compiled_only_when_none_is_built(isolated, monkeypatch):
    prebuilt = isolated / "prebuilt"
    monkeypatch.setenv("DISTSERVE_KERNELS_DIR", str(prebuilt))
    zen4 = supported(cpu_flags("flags: " + CPUS["Zen 4 / Ice Lake (AVX-512 with VNNI)"][0]), "x86_64")
    src = kernels.source("paged_attention")
    nothing = kernels.choose("paged_attention", variants=zen4)
    assert nothing.built is None and nothing.spec.variant.name == "avx512vnni"  # the lazy build's target
    fake_built(prebuilt, Spec("paged_attention", src, by_name("generic", "x86_64")))
    assert kernels.choose("paged_attention", variants=zen4).spec.variant.name == "generic"  # built beats better-but-unbuilt
    d = fake_built(kernels.cache_root(), Spec("paged_attention", src, by_name("avx2", "x86_64")))
    choice = kernels.choose("paged_attention", variants=zen4)
    assert choice.spec.variant.name == "avx2" and choice.built.path.parent == d
    # a build of other sources (an older checkout) is not taken
    (kernels.cache_root() / "paged_attention").rename(isolated / "old")
    stale = fake_built(kernels.cache_root(), Spec("paged_attention", src, by_name("avx2", "x86_64")))
    (stale / "build.json").write_text(json.dumps(dict(module="distserve_paged_attention_avx2", file="distserve_paged_attention_avx2.so", inputs="0" * 64)))
    assert kernels.choose("paged_attention", variants=zen4).spec.variant.name == "generic"


# -- the cache key --------------------------------------------------------------------------------
def test_the_cache_key_follows_sources_header_flags_and_torch_but_not_the_host_name(tmp_path, monkeypatch, no_compiler_needed):
    src_dir = tmp_path / "src"
    shutil.copytree(KERNELS_DIR, src_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    spec = Spec("paged_attention", src_dir / "paged_attention.cpp", by_name("avx2", "x86_64"))
    base, where = spec.inputs(), cache.target(spec, tmp_path / "root")
    for host in ("pod-a-7f9c", "pod-b-1234"):
        monkeypatch.setattr(socket, "gethostname", lambda: host)
        monkeypatch.setattr("platform.node", lambda: host)
        assert spec.inputs() == base and cache.target(spec, tmp_path / "root") == where
    assert Spec(spec.kernel, spec.source, by_name("generic", "x86_64")).inputs() != base  # flags
    (src_dir / "vec.h").write_text((src_dir / "vec.h").read_text() + "\n// a change\n")
    assert spec.inputs() != base  # the header
    changed_header = spec.inputs()
    spec.source.write_text(spec.source.read_text() + "\n// a change\n")
    assert spec.inputs() not in (base, changed_header)  # the source
    import torch

    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert spec.inputs() not in (base, changed_header)  # torch
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "/bin/true")  # another compiler: another directory, same inputs
    assert cache.target(spec, tmp_path / "root") != where


def test_a_build_made_on_one_host_is_found_on_another(tmp_path, monkeypatch, no_compiler_needed):
    spec = Spec("paged_attention", kernels.source("paged_attention"), by_name("generic", "x86_64"))
    monkeypatch.setattr(socket, "gethostname", lambda: "image-builder")
    built, seconds = cache.build(spec, tmp_path, compile=fake_compile())
    assert seconds > 0 and json.loads((built.path.parent / "build.json").read_text())["inputs"] == spec.inputs()
    monkeypatch.setattr(socket, "gethostname", lambda: "decode-6d5f-xk2")
    monkeypatch.setenv("CXX", "/nonexistent/c++")  # a runtime image without a compiler
    assert cache.find(spec, tmp_path).path == built.path
    again, seconds = cache.build(spec, tmp_path, compile=fake_compile())
    assert again.path == built.path and seconds == 0


# -- the build lock -------------------------------------------------------------------------------
HOLDER = """
import sys, time
from pathlib import Path
from distserve.engine.kernels.cache import BuildLock, _owner
final = Path(sys.argv[1])
lock = BuildLock(final.with_name(final.name + ".lock"), 5).__enter__()
assert lock.held
tmp = final.with_name(f"{final.name}.tmp-{_owner()}")
tmp.mkdir()
(tmp / "lock").write_text("")  # torch's FileBaton file, as a build killed midway leaves it
print("building", flush=True)
time.sleep(120)
"""


def start_holder(final: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(final)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "building"
    return proc


def test_a_builder_killed_midway_leaves_nothing_that_blocks_the_next_start(tmp_path, no_compiler_needed):
    spec = Spec("paged_attention", kernels.source("paged_attention"), by_name("generic", "x86_64"))
    final = cache.target(spec, tmp_path)
    final.parent.mkdir(parents=True)
    holder = start_holder(final)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    (left,) = final.parent.glob("*.tmp-*")  # its half-made build, with torch's lock file in it
    t0 = time.monotonic()
    built, seconds = cache.build(spec, tmp_path, lock_s=60, compile=fake_compile())
    assert time.monotonic() - t0 < 10, "waited on the dead builder's lock"
    assert seconds > 0 and built.path.parent == final and not left.exists()


def test_a_lock_held_past_the_bound_is_waited_for_no_longer(tmp_path, no_compiler_needed):
    spec = Spec("paged_attention", kernels.source("paged_attention"), by_name("generic", "x86_64"))
    final = cache.target(spec, tmp_path)
    final.parent.mkdir(parents=True)
    holder = start_holder(final)  # alive, but stuck
    try:
        waits: list[str] = []
        t0 = time.monotonic()
        built, _ = cache.build(spec, tmp_path, lock_s=1.0, compile=fake_compile(), on_wait=waits.append)
        assert 1.0 <= time.monotonic() - t0 < 10
        assert built.path.parent == final
        assert waits and f"{socket.gethostname()}-{holder.pid}" in waits[0]  # the waiter says whom it waits for
        assert len(list(final.parent.glob("*.tmp-*"))) == 1  # the live holder's directory is left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_waits_for_the_first_build_instead_of_compiling_again(tmp_path, no_compiler_needed):
    spec = Spec("paged_attention", kernels.source("paged_attention"), by_name("generic", "x86_64"))
    code = ("import sys, time; from pathlib import Path\n"
            "from distserve.engine.kernels import cache; from distserve.engine.kernels.variants import by_name\n"
            "def slow(spec, out): time.sleep(2.0); out.write_bytes(b'')\n"
            "spec = cache.Spec('paged_attention', Path(sys.argv[2]), by_name('generic', 'x86_64'))\n"
            "print(cache.build(spec, Path(sys.argv[1]), compile=slow)[1], flush=True)")
    first = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(spec.source)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "CXX": sys.executable})
    deadline = time.monotonic() + 20
    while not list((tmp_path / "paged_attention").glob("*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    _, seconds = cache.build(spec, tmp_path, compile=fake_compile())
    assert seconds == 0  # found the first one's build after waiting
    assert float(first.communicate(timeout=30)[0]) >= 2.0


# -- the torch fallback ---------------------------------------------------------------------------
def native_gauge() -> dict[str, float]:
    text = generate_latest(Metrics("decode").registry).decode()
    return {ln.split('"')[1]: float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("distserve_native_kernels{")}


def test_disabled_kernels_run_the_torch_path_with_a_warning_and_the_gauge_at_zero(isolated, monkeypatch, caplog):
    monkeypatch.setenv("DISTSERVE_KERNELS", "0")
    with caplog.at_level(logging.WARNING, logger="distserve.engine.kernels"):
        assert kernels.load("paged_attention") is None
    assert "native kernel paged_attention unavailable (disabled by DISTSERVE_KERNELS=0)" in caplog.text
    assert "slower torch path" in caplog.text
    assert native_gauge() == {"paged_attention": 0.0}


def test_a_kernel_that_does_not_compile_falls_back_with_the_compilers_error(isolated, caplog):
    src = isolated / "broken.cpp"
    src.write_text("#error this is not a kernel\n")
    with caplog.at_level(logging.WARNING, logger="distserve.engine.kernels"):
        assert kernels.load("broken", src=src) is None
    assert "native kernel broken unavailable" in caplog.text and "slower torch path" in caplog.text
    if "no C++ compiler" not in caplog.text:
        assert "compiling native kernel broken" in caplog.text and "this is not a kernel" in caplog.text
        (log,) = (kernels.cache_root() / "broken").glob("*.failed.log")  # kept, and named in the warning
        assert str(log) in caplog.text
        assert not list((kernels.cache_root() / "broken").glob("*.tmp-*"))
    assert kernels.status()["broken"].native is False and native_gauge() == {"broken": 0.0}


def test_no_gauge_series_before_the_engine_asks_for_a_kernel(isolated):
    assert native_gauge() == {}


# -- ahead of time --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def prebuilt(request, tmp_path_factory) -> Path:
    """This CPU's class built by `distserve kernels build` once, into pytest's cache folder (so a later
    run finds it built: the builds are keyed by content) or a temp folder without one."""
    try:
        cache.compiler_version()
    except cache.BuildError as exc:
        pytest.skip(f"{exc}")
    try:
        out = Path(request.config.cache.mkdir("distserve-kernels-aot"))
    except AttributeError:  # -p no:cacheprovider
        out = tmp_path_factory.mktemp("kernels-aot")
    env = {k: v for k, v in os.environ.items() if k not in ("DISTSERVE_KERNEL_VARIANT", "DISTSERVE_KERNELS_DIR")}
    run = subprocess.run([sys.executable, "-m", "distserve.cli", "kernels", "build", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    print(run.stdout, run.stderr)
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.mark.kernel_build
@pytest.mark.timeout(1000)
def test_an_ahead_of_time_build_is_used_at_import_without_a_compiler(prebuilt, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "DISTSERVE_KERNEL_VARIANT"},
           "DISTSERVE_KERNELS_DIR": str(prebuilt), "DISTSERVE_HOME": str(tmp_path / "home"), "CXX": "/nonexistent/c++"}
    code = ("import json; from distserve.engine import kernels\n"
            "pa, il = kernels.paged_attention(), kernels.int8_linear()\n"
            "assert pa.supports_head_dim(64) and il is not None\n"
            "print(json.dumps({k: [s.variant, s.where, s.compiled_s] for k, s in kernels.status().items()}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    best = (supported(cpu_flags()) or (NATIVE,))[0].name
    for kernel, (variant, where, compiled_s) in json.loads(run.stdout).items():
        assert variant == best and where.startswith(str(prebuilt / kernel)) and compiled_s == 0, (kernel, variant, where)
    assert "compiling" not in run.stderr and not (tmp_path / "home" / "kernels").exists()
    status = subprocess.run([sys.executable, "-m", "distserve.cli", "kernels", "status"], capture_output=True, text=True, env=env, timeout=120)
    runs = [ln for ln in status.stdout.splitlines() if ln.endswith("<- runs")]
    assert len(runs) == 2 and all(ln.split()[0] == best and str(prebuilt) in ln for ln in runs), status.stdout


@pytest.mark.kernel_build
@pytest.mark.timeout(1000)
def test_build_missing_compiles_only_what_no_root_has(prebuilt, tmp_path):
    """`kernels build --missing` (what `distserve up` runs beside the model pull): nothing when a root
    has this CPU's builds; else the kernels the first use would compile, into the lazy cache."""
    home = tmp_path / "home"
    env = {**{k: v for k, v in os.environ.items() if k != "DISTSERVE_KERNEL_VARIANT"}, "DISTSERVE_HOME": str(home), "CXX": "/nonexistent/c++"}
    argv = [sys.executable, "-m", "distserve.cli", "kernels", "build", "--missing", "--jobs", "2"]
    found = subprocess.run(argv, capture_output=True, text=True, env={**env, "DISTSERVE_KERNELS_DIR": str(prebuilt)}, timeout=120)
    assert found.returncode == 0 and found.stdout == "" and not (home / "kernels").exists(), found.stdout + found.stderr
    missing = subprocess.run(argv, capture_output=True, text=True, env={k: v for k, v in env.items() if k != "DISTSERVE_KERNELS_DIR"}, timeout=120)
    assert missing.returncode == 1, missing.stdout + missing.stderr  # no compiler here: both builds fail, and say so
    assert f"building 2 kernel builds into {home / 'kernels'}" in missing.stdout, missing.stdout
    assert missing.stdout.count("FAILED: no C++ compiler") == 2, missing.stdout
    off = subprocess.run(argv, capture_output=True, text=True, env={**env, "DISTSERVE_KERNELS": "0"}, timeout=120)
    assert off.returncode == 0 and off.stdout == "", off.stdout
