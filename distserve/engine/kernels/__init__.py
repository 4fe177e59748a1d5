"""Optional native kernels, compiled on first use and cached under $DISTSERVE_HOME/kernels.

`paged_attention()` returns the compiled module, or None when it cannot be built (no compiler, no
ninja, or DISTSERVE_KERNELS=0); callers then use the pure-torch path, which gives the same tokens.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)


@functools.cache
def paged_attention():
    if os.environ.get("DISTSERVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        from distserve.engine.models import home

        build = home() / "kernels" / f"{platform.machine()}-{platform.node()}"
        build.mkdir(parents=True, exist_ok=True)
        src = Path(__file__).with_name("paged_attention.cpp")
        return load(
            name="distserve_paged_attention",
            sources=[str(src)],
            build_directory=str(build),
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler or headers: fall back to the torch path
        log.warning("native paged attention unavailable, using the torch path: %s", exc)
        return None
