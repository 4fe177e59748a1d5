"""`distserve kernels build | status`: the native kernels compiled ahead of time per CPU class (for an
image, or after `pip install`), and which build this CPU would run."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from distserve.engine import kernels
from distserve.engine.kernels.cache import BuildError, Spec, build, compile_extension, find
from distserve.engine.kernels.variants import by_name, cpu_flags, supported, variants


def add_kernels_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="compile the kernels for this CPU's class, or for every class with --all (e.g. at image build)")
    b.add_argument("--all", action="store_true", help="every class of this kind of machine (x86-64: avx512vnni, avx2, generic)")
    b.add_argument("--variant", action="append", default=[], help="a class by name (repeat); native = -march=native")
    b.add_argument("--kernel", action="append", default=[], choices=sorted(kernels.KERNELS), help="only this kernel (repeat; default: all)")
    b.add_argument("--out", default="", help="root to write to (default: DISTSERVE_KERNELS_DIR's first entry, else "
                                            "$DISTSERVE_HOME/kernels, the lazy cache); runtime looks in DISTSERVE_KERNELS_DIR")
    b.add_argument("--missing", action="store_true", help="only the kernels this CPU would otherwise compile at first use "
                                                         "(no usable build in any root), into the lazy cache; `distserve up` runs this")
    b.add_argument("--jobs", type=int, default=1, help="compiles at once (each takes a core and ~1 GB for 15-25 s, longer under load)")
    sub.add_parser("status", help="this CPU's classes, what is built where, and which build each kernel would run")
    return p


def kernels_main(args) -> None:
    if args.action == "build":
        sys.exit(build_main(args))
    status_main()


def build_main(args) -> int:
    if args.missing:
        if kernels.disabled():
            return 0
        out = Path(args.out) if args.out else kernels.cache_root()  # where the first use would compile it
        jobs = [c.spec for k in (args.kernel or kernels.KERNELS) if (c := kernels.choose(k)).built is None]
        if not jobs:
            return 0
    else:
        out = Path(args.out) if args.out else kernels.roots()[0]
        chosen = [by_name(n) for n in args.variant] or (list(variants()) if args.all else [kernels.candidates()[0]])
        jobs = [Spec(k, kernels.source(k), v) for v in chosen for k in (args.kernel or kernels.KERNELS)]
    print(f"building {len(jobs)} kernel builds into {out} ({max(1, args.jobs)} at a time; 15-25 s each on an idle core)", flush=True)

    def one(spec: Spec) -> bool:
        name = f"{spec.kernel:16} {spec.variant.name:11}"
        try:
            built, seconds = build(spec, out, compile=compile_extension,
                                   on_wait=lambda owner: print(f"{name} waiting for {owner}", flush=True))
        except (BuildError, OSError) as exc:
            print(f"{name} FAILED: {exc}", flush=True)
            return False
        print(f"{name} {f'built in {seconds:.0f} s' if seconds else 'already built':16} {built.path.parent}", flush=True)
        return True

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        ok = list(pool.map(one, jobs))
    return 0 if all(ok) else 1


def status_main() -> None:
    flags = cpu_flags()
    runs = supported(flags)
    print(f"CPU: {_cpu_model()} ({platform.machine()}); runs: {', '.join(v.name for v in runs) or 'none of the classes (native builds)'}")
    env = {k: os.environ[k] for k in ("DISTSERVE_KERNELS", "DISTSERVE_KERNEL_VARIANT", "DISTSERVE_KERNELS_DIR") if k in os.environ}
    if env:
        print("environment: " + " ".join(f"{k}={v}" for k, v in env.items()))
    print("looked up in: " + ", ".join(str(r) for r in kernels.roots()) + " (the last is the lazy cache)")
    disabled = kernels.disabled()
    for kernel in kernels.KERNELS:
        choice = kernels.choose(kernel)
        print(f"\n{kernel}:")
        for v in (*variants(), *([] if choice.spec.variant in variants() else [choice.spec.variant])):
            spec = Spec(kernel, kernels.source(kernel), v)
            inputs = spec.inputs()
            found = next((f for r in kernels.roots() if (f := find(spec, r, inputs))), None)
            state = (f"built {found.manifest.get('built_at', '')[:10]} by {found.manifest.get('compiler', '?')}: {found.path.parent}"
                     if found else "not built (for these sources)")
            mark = "  <- runs" if v == choice.spec.variant and not disabled else ""
            print(f"  {v.name:11} {'' if kernels.runnable(v, flags) else '(not this CPU) '}{state}{mark}")
        if disabled:
            print("  runs the torch path: DISTSERVE_KERNELS=0")
        elif choice.built is None:
            print(f"  the first start compiles {choice.spec.variant.name} into the lazy cache (15-25 s a kernel), "
                  f"or run `distserve kernels build` now")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
