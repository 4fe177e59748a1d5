"""Optional native kernels: built ahead of time per CPU class, chosen by CPU at first use.

`paged_attention()` (decode attention over the paged cache, fp32 or int8 with per-block scales, the
rotary + KV write and the quantising int8 KV write) and `int8_linear()` (int8 x int8 linear layer
reading a plain int8 weight in place) return the extension module, or None when none can be had
(DISTSERVE_KERNELS=0, or no build and no working compiler); callers then use the pure-torch paths,
which compute the same thing, slower.

The first call for a kernel, in order:
1. the variants this CPU runs, best first (variants.py: avx512vnni, avx2, generic on x86-64, from
   /proc/cpuinfo), or the one DISTSERVE_KERNEL_VARIANT names;
2. the best of them with a finished build (cache.py) in a prebuilt directory (DISTSERVE_KERNELS_DIR,
   `os.pathsep`-separated; what `distserve kernels build` fills at image build) or in the lazy cache
   $DISTSERVE_HOME/kernels is imported, no compiler needed;
3. else the best variant is compiled into the lazy cache (15-25 s a kernel on an idle core, said on screen at WARNING), and
   imported; a failure there leaves the torch path, with a warning.
`status()` says what this process runs per kernel; metrics.py exports it as `distserve_native_kernels`.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from distserve.engine.kernels.cache import Built, Spec, build, compile_extension, find, import_built
from distserve.engine.kernels.variants import NATIVE, Variant, by_name, cpu_flags, supported

log = logging.getLogger(__name__)

KERNELS = {"paged_attention": "paged_attention.cpp", "int8_linear": "int8_linear.cpp"}


@dataclass(frozen=True, slots=True)
class Status:
    """What one kernel runs in this process."""

    kernel: str
    variant: str        # the build's variant; "" on the torch path
    where: str          # the .so, or why the torch path runs
    compiled_s: float   # seconds this process spent compiling it (0: prebuilt or cached)

    @property
    def native(self) -> bool:
        return bool(self.variant)


_status: dict[str, Status] = {}


def status() -> dict[str, Status]:
    """Per kernel this process asked for (by the engine's choice), what it runs."""
    return dict(_status)


def disabled() -> bool:
    """DISTSERVE_KERNELS=0: every kernel runs its torch path, and nothing is built."""
    return os.environ.get("DISTSERVE_KERNELS", "1") == "0"


def cache_root() -> Path:
    """Where lazy builds go (and `distserve kernels build` without --out or DISTSERVE_KERNELS_DIR)."""
    from distserve.models import home

    return home() / "kernels"


def roots() -> list[Path]:
    """Where finished builds are looked for, first match wins: DISTSERVE_KERNELS_DIR's, then the cache."""
    prebuilt = [Path(p) for p in os.environ.get("DISTSERVE_KERNELS_DIR", "").split(os.pathsep) if p]
    return [*prebuilt, cache_root()]


def source(kernel: str) -> Path:
    return Path(__file__).with_name(KERNELS[kernel])


def runnable(v: Variant, flags: frozenset[str] | None = None) -> bool:
    return v is NATIVE or v.needs <= (cpu_flags() if flags is None else flags)


def candidates(flags: frozenset[str] | None = None, machine: str | None = None) -> tuple[Variant, ...]:
    """The variants to try on this CPU, best first: DISTSERVE_KERNEL_VARIANT's if it runs here, else
    every supported one; a CPU below every class gets `native`."""
    flags = cpu_flags() if flags is None else flags
    forced = os.environ.get("DISTSERVE_KERNEL_VARIANT", "")
    if forced:
        v = by_name(forced, machine)
        if runnable(v, flags):
            return (v,)
        log.warning("DISTSERVE_KERNEL_VARIANT=%s: this CPU lacks %s; choosing by CPU", forced, " ".join(sorted(v.needs - flags)))
    return supported(flags, machine) or (NATIVE,)


@dataclass(frozen=True, slots=True)
class Choice:
    spec: Spec            # the kernel and variant to run
    built: Built | None   # its finished build, or None: it must be compiled first


def choose(kernel: str, src: Path | None = None, variants: tuple[Variant, ...] | None = None) -> Choice:
    """The best of `variants` (default: `candidates()`) with a finished build, else the best one, unbuilt."""
    src = src or source(kernel)
    variants = variants or candidates()
    for v in variants:
        spec = Spec(kernel, src, v)
        inputs = spec.inputs()
        for root in roots():
            if found := find(spec, root, inputs):
                return Choice(spec, found)
    return Choice(Spec(kernel, src, variants[0]), None)


def _compile_on_screen(spec: Spec, out: Path) -> None:
    log.warning("compiling native kernel %s for %s CPUs (15-25 s; `distserve kernels build` ahead "
                "of time avoids this)...", spec.kernel, spec.variant.name)
    compile_extension(spec, out)


def load(kernel: str, src: Path | None = None, variant: str | None = None):
    """The extension module of `kernel` (a KERNELS name, or any name with `src`), per the order in the
    module docstring; `variant` forces one (it must run on this CPU), without recording a status."""
    if disabled():
        return _fallback(kernel, "disabled by DISTSERVE_KERNELS=0", record=variant is None)
    try:
        if variant is not None:
            v = by_name(variant)
            if not runnable(v):
                raise ValueError(f"this CPU cannot run the {variant} build")
            choice = choose(kernel, src, (v,))
        else:
            choice = choose(kernel, src)
        spec, built, seconds = choice.spec, choice.built, 0.0
        if built is None:
            def waiting(owner: str) -> None:
                log.warning("waiting for %s, which is compiling native kernel %s for %s CPUs...", owner, kernel, spec.variant.name)

            built, seconds = build(spec, cache_root(), compile=_compile_on_screen, on_wait=waiting)
            if seconds:
                log.warning("compiled native kernel %s for %s CPUs in %.0f s", kernel, spec.variant.name, seconds)
        mod = import_built(spec, built)
    except Exception as exc:  # no compiler, a failed build, a build that does not load
        return _fallback(kernel, f"{type(exc).__name__}: {exc}", record=variant is None)
    log.info("native kernel %s: %s build %s", kernel, spec.variant.name, built.path)
    if variant is None:
        _status[kernel] = Status(kernel, spec.variant.name, str(built.path), seconds)
    return mod


def _fallback(kernel: str, why: str, record: bool) -> None:
    log.warning("native kernel %s unavailable (%s); running the slower torch path", kernel, why)
    if record:
        _status[kernel] = Status(kernel, "", why, 0.0)
    return None


@functools.cache
def paged_attention():
    return load("paged_attention")


@functools.cache
def int8_linear():
    return load("int8_linear")
