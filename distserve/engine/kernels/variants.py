"""The CPU classes the native kernels are built for, and which of them a CPU can run.

The kernels pick their code path from the compiler's target macros (vec.h, int8_linear.cpp):

    __AVX512F__ (+ __AVX512VNNI__)  16 fp32 lanes; int8_linear's 8-row vpdpwssd micro-kernel
    __AVX2__ and __FMA__            8 lanes; int8_linear's vpmaddwd micro-kernel
    neither                         4 lanes of GCC's vector extension (SSE on x86, NEON on arm64)

so three builds cover what the code distinguishes on x86-64. Each targets an x86-64 ISA level (the
psABI's v2/v3/v4) rather than a named CPU, so one build runs on every Intel or AMD part of its class:
`avx512vnni` is v4 (AVX-512 F/BW/CD/DQ/VL) plus VNNI (Cascade Lake, Ice Lake and later Xeons, Zen 4
and later EPYCs); `avx2` is v3 (AVX2, FMA, BMI2: Haswell, Zen 1 and later; also AVX-512 parts without
VNNI, such as Skylake-SP); `generic` is v2 (SSE4.2, POPCNT). Each lists the /proc/cpuinfo flags its
level implies, and a CPU runs the best one whose flags it has. Other machines (arm64) get one
`generic` build with the compiler's default target. `native` (-march=native) is never chosen on its
own: it is what a CPU below x86-64-v2 builds, and what DISTSERVE_KERNEL_VARIANT=native asks for.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}  # abm: LZCNT
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True, slots=True)
class Variant:
    name: str                 # directory and module suffix, and what DISTSERVE_KERNEL_VARIANT names
    cflags: tuple[str, ...]   # target flags, after the common ones
    needs: frozenset[str]     # /proc/cpuinfo flags a CPU must have to run it


X86_64 = (  # best first
    Variant("avx512vnni", ("-march=x86-64-v4", "-mavx512vnni"), _V4 | {"avx512_vnni"}),
    Variant("avx2", ("-march=x86-64-v3",), _V3),
    Variant("generic", ("-march=x86-64-v2",), _V2),
)
OTHER = (Variant("generic", (), frozenset()),)
NATIVE = Variant("native", ("-march=native",), frozenset())


def variants(machine: str | None = None) -> tuple[Variant, ...]:
    """Every variant `distserve kernels build --all` makes for this kind of machine, best first."""
    machine = machine or platform.machine()
    return X86_64 if machine in ("x86_64", "AMD64") else OTHER


def by_name(name: str, machine: str | None = None) -> Variant:
    for v in (*variants(machine), NATIVE):
        if v.name == name:
            return v
    allowed = ", ".join(v.name for v in (*variants(machine), NATIVE))
    raise ValueError(f"kernel variant must be one of {allowed}, got {name!r}")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The first CPU's flags in /proc/cpuinfo (x86: `flags`, arm64: `Features`); empty if unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def supported(flags: frozenset[str], machine: str | None = None) -> tuple[Variant, ...]:
    """The variants a CPU with these flags can run, best first; empty for an x86-64 CPU below v2."""
    return tuple(v for v in variants(machine) if v.needs <= flags)
