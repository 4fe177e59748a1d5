"""Optional native kernels, compiled on first use and cached under $DISTSERVE_HOME/kernels.

`paged_attention()` (decode attention over the paged cache, fp32 or int8 with per-block scales, and
the quantising int8 KV write) and `int8_linear()` (int8 x int8 linear layer reading a plain int8
weight in place) return the compiled module, or None when it cannot be built (no compiler, no ninja,
or DISTSERVE_KERNELS=0); callers then use the pure-torch paths, which compute the same thing.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]


def build(name: str, source: str, extra_cflags: tuple[str, ...] = (), variant: str = ""):
    """Compiles `source` as module `name` (cached per machine and `variant`); None if it cannot be
    built. `extra_cflags` go after -march=native, e.g. ("-mno-avx512f",) for the AVX2 code path."""
    if os.environ.get("DISTSERVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        from distserve.engine.models import home

        build_dir = home() / "kernels" / f"{platform.machine()}-{platform.node()}{variant and '-' + variant}"
        build_dir.mkdir(parents=True, exist_ok=True)
        src = Path(__file__).with_name(source)
        # torch rebuilds when a source or a flag changes, not a header: the header's hash is a flag
        header = hashlib.sha256(Path(__file__).with_name("vec.h").read_bytes()).hexdigest()[:16]
        return load(name=name, sources=[str(src)], build_directory=str(build_dir),
                    extra_cflags=[*_CFLAGS, *extra_cflags, f"-DDS_VEC_H_{header}"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler or headers: fall back to the torch path
        log.warning("native kernel %s unavailable, using the torch path: %s", name, exc)
        return None


@functools.cache
def paged_attention():
    return build("distserve_paged_attention", "paged_attention.cpp")


@functools.cache
def int8_linear():
    return build("distserve_int8_linear", "int8_linear.cpp")
