"""Builds of the native kernels: one directory per kernel, variant and content, found without a compiler.

Layout under a root (`distserve kernels build --out ROOT`, or the lazy cache $DISTSERVE_HOME/kernels):

    ROOT/<kernel>/<variant>-<key>/        a finished build, never written again
        distserve_<kernel>_<variant>.so   the extension module
        build.json                        what it was built from (the `inputs` hash), by which compiler, when, how long
        build.log                         the compiler command and its output
    ROOT/<kernel>/<variant>-<key>.lock    held (flock) by the process building it
    ROOT/<kernel>/<variant>-<key>.tmp-<host>-<pid>/   a build in progress

`inputs` hashes what decides the binary and is known without a compiler: the source, the headers next
to it, every flag, torch's version and C++ ABI, Python's extension suffix. <key> adds the compiler's
version line. A runtime image without a compiler takes any finished directory whose build.json has its
`inputs`; a host name appears nowhere, so every container of an image shares its builds.

Building: the builder holds the lock while it compiles into its private .tmp directory, writes
build.json, and renames the directory into place, so a build killed midway leaves only a .tmp
directory and a lock the kernel released with its process (flock), never a half-built build. A waiter
polls the lock up to `lock_s`; then it rechecks for the finished build, and past the bound (an owner
alive but stuck) builds in its own .tmp directory without the lock. Whoever holds the lock removes
.tmp directories whose process is dead on this host or which are older than the bound.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distserve.engine.kernels.variants import Variant

# the flags every build shares; the variant's target flags follow
COMMON_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
# what torch.utils.cpp_extension passes for an extension of this torch (2.13): C++20, position independent
# (not its -DTORCH_API_INCLUDE_EXTENSION_H: the kernels include ATen's core and torch's pybind11 casters,
# not torch/extension.h, whose whole C++ frontend was 30 of a build's 40 s)
RECIPE = ("-fPIC", "-std=c++20")
LOCK_S = 600.0  # longest wait for another process's build (one takes 15-25 s on an idle core, a minute or more under load)


class BuildError(RuntimeError):
    """A kernel could not be built (no compiler, or the compiler failed)."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One kernel built for one variant."""

    kernel: str       # e.g. "paged_attention"
    source: Path      # its .cpp; the headers next to it count as inputs too
    variant: Variant

    @property
    def module(self) -> str:
        return f"distserve_{self.kernel}_{self.variant.name}"

    @property
    def cflags(self) -> tuple[str, ...]:
        return (*RECIPE, *COMMON_CFLAGS, *self.variant.cflags)

    def inputs(self) -> str:
        """Hash of everything but the compiler that decides the binary."""
        import torch

        h = hashlib.sha256()
        for part in (self.kernel, self.module, *self.cflags, torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI),
                     sysconfig.get_config_var("EXT_SUFFIX") or ""):
            h.update(part.encode() + b"\0")
        for path in (self.source, *sorted(self.source.parent.glob("*.h"))):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Built:
    """A finished build directory."""

    path: Path        # the .so
    manifest: dict    # its build.json


def compiler() -> str:
    return os.environ.get("CXX", "c++")


def compiler_version() -> str:
    try:
        out = subprocess.run([compiler(), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"no C++ compiler ({compiler()}): {exc}") from None
    if out.returncode != 0:
        raise BuildError(f"{compiler()} --version failed: {out.stderr.strip()}")
    return out.stdout.splitlines()[0].strip() if out.stdout else compiler()


def find(spec: Spec, root: Path, inputs: str | None = None) -> Built | None:
    """A finished build of `spec` under `root` (whatever compiler made it), or None."""
    inputs = inputs or spec.inputs()
    for d in sorted((root / spec.kernel).glob(f"{spec.variant.name}-*")):
        if not d.is_dir() or ".tmp-" in d.name:
            continue
        try:
            manifest = json.loads((d / "build.json").read_text())
        except (OSError, ValueError):
            continue
        so = d / manifest.get("file", "")
        if manifest.get("inputs") == inputs and manifest.get("module") == spec.module and so.is_file():
            return Built(so, manifest)
    return None


def import_built(spec: Spec, built: Built):
    """The extension module of a finished build (torch is imported first: the module links its libraries)."""
    import torch  # noqa: F401

    mspec = importlib.util.spec_from_file_location(spec.module, built.path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


def compile_extension(spec: Spec, out: Path) -> None:
    """Compiles and links `spec` into `out` in one compiler call (what torch's cpp_extension does with
    ninja, without its importing the result: a build for a CPU class this one lacks must not be loaded)."""
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    cmd = [compiler(), f"-DTORCH_EXTENSION_NAME={spec.module}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *(f"-isystem{p}" for p in [*include_paths(), sysconfig.get_path("include")]), *spec.cflags,
           str(spec.source), "-shared", "-fopenmp", *(f"-L{p}" for p in library_paths()),
           "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python", "-o", str(out)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise BuildError(f"no C++ compiler ({compiler()}): {exc}") from None
    (out.parent / "build.log").write_text(shlex.join(cmd) + "\n" + r.stdout + r.stderr)
    if r.returncode != 0:
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines()[-5:]
        raise BuildError(f"{compiler()} exited {r.returncode}: {' | '.join(errors[:3])}")


class BuildLock:
    """An flock on `path`, waited for up to `timeout_s`; `held` says whether it was got. The holder
    writes its host, pid and start time into the file for waiters to report."""

    def __init__(self, path: Path, timeout_s: float, on_wait: Callable[[str], None] = lambda owner: None):
        self.path, self.timeout_s, self.on_wait = path, timeout_s, on_wait
        self.held = False
        self.fd = -1

    def __enter__(self) -> BuildLock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, told = time.monotonic() + self.timeout_s, False
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not told:
                    self.on_wait(self.path.read_text().strip() or "another process")
                    told = True
                if time.monotonic() >= deadline:
                    return self
                time.sleep(0.2)
                continue
            self.held = True
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{_owner()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # drops the flock


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _stale(tmp: Path, bound_s: float) -> bool:
    """A .tmp-<host>-<pid> build directory whose process is gone (this host), or older than the bound."""
    host, _, pid = tmp.name.partition(".tmp-")[2].rpartition("-")
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        return time.time() - tmp.stat().st_mtime > bound_s
    except FileNotFoundError:
        return False


def target(spec: Spec, root: Path, inputs: str | None = None) -> Path:
    """The directory a build of `spec` by this compiler gets under `root`."""
    key = hashlib.sha256(f"{inputs or spec.inputs()}\0{compiler_version()}".encode()).hexdigest()[:16]
    return root / spec.kernel / f"{spec.variant.name}-{key}"


def build(spec: Spec, root: Path, *, lock_s: float = LOCK_S, compile: Callable[[Spec, Path], None] = compile_extension,
          on_wait: Callable[[str], None] = lambda owner: None) -> tuple[Built, float]:
    """A finished build of `spec` under `root`, compiling it unless one is there: (build, seconds spent
    compiling in this call, 0 when none). Raises BuildError."""
    inputs = spec.inputs()
    if found := find(spec, root, inputs):
        return found, 0.0
    final = target(spec, root, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    with BuildLock(final.with_name(final.name + ".lock"), lock_s, on_wait) as lock:
        if found := find(spec, root, inputs):
            return found, 0.0  # built by the process we waited for
        if lock.held:
            for tmp in final.parent.glob(final.name + ".tmp-*"):
                if _stale(tmp, lock_s):
                    shutil.rmtree(tmp, ignore_errors=True)
        tmp = final.with_name(f"{final.name}.tmp-{_owner()}")
        failed = final.with_name(final.name + ".failed.log")
        shutil.rmtree(tmp, ignore_errors=True)
        failed.unlink(missing_ok=True)
        tmp.mkdir()
        t0 = time.monotonic()
        try:
            so = tmp / f"{spec.module}.so"
            compile(spec, so)
            seconds = time.monotonic() - t0
            import torch

            manifest = dict(kernel=spec.kernel, variant=spec.variant.name, module=spec.module, file=so.name, inputs=inputs,
                            compiler=compiler_version(), torch=torch.__version__, python=sys.version.split()[0], cflags=list(spec.cflags),
                            built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), seconds=round(seconds, 1))
            (tmp / "build.json").write_text(json.dumps(manifest, indent=1) + "\n")
            try:
                tmp.rename(final)
            except OSError:  # finished meanwhile by a process that waited past the bound
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException as exc:
            if (tmp / "build.log").exists():  # kept for the error to point at
                (tmp / "build.log").replace(failed)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, BuildError) and failed.exists():
                raise BuildError(f"{exc} (log: {failed})") from None
            raise
    found = find(spec, root, inputs)
    if found is None:
        raise BuildError(f"the build of {spec.module} did not appear in {final}")
    return found, seconds
