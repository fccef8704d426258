"""SGD-SaI's fused CPU update (``csrc/sgd_sai_cpu.cpp``): built with the machine's C++ compiler
on first use, cached by torch's extension builder, and the foreach path wherever it cannot be.

The build takes about a minute once per machine (torch's headers are large); later processes
load the cached library in milliseconds. It is compiled for this CPU's instruction set
(``-march=native``), so the cache name carries a digest of the CPU's flags: a home folder shared
by different machines never loads a library built for another CPU. ``SAI_FUSED=0`` turns the
fused update off (the foreach path, as on CUDA).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType

_SOURCE = Path(__file__).with_name("csrc") / "sgd_sai_cpu.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None


def _cpu_digest() -> str:
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags += next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    source = _SOURCE.read_bytes() if _SOURCE.is_file() else b""
    return hashlib.sha256(flags.encode() + source).hexdigest()[:12]


def enabled() -> bool:
    return os.environ.get("SAI_FUSED", "1") != "0"


def failure() -> str:
    """Why ``cpu_kernel()`` returned None."""
    if not enabled():
        return "the fused update is turned off (SAI_FUSED=0)"
    return f"the fused CPU update could not be built ({_failure or 'not tried yet'})"


def cpu_kernel() -> ModuleType | None:
    """The compiled extension, or None (turned off, no compiler, a failed build: warned once)."""
    global _module, _failure
    if _module is not None or _failure is not None or not enabled():
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except Exception as exc:  # no compiler, no ninja, headers missing: fall back
                _failure = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                fix = (
                    ""
                    if isinstance(exc, BuildLockHeld)
                    else " Install a C++ compiler and ninja to fix."
                )
                warnings.warn(
                    f"SGD-SaI: the fused CPU update could not be built ({_failure}); using the "
                    f"foreach update (correct, slower).{fix}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _module


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load

    if sys.platform == "darwin":
        raise RuntimeError("the fused update is built on Linux only")
    name = f"sai_sgd_sai_cpu_{_cpu_digest()}"
    _wait_for_build_lock(_build_directory(name))
    if shutil.which("ninja") is None:  # the pip package's binary, when its bin/ is not on PATH
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return load(
        name=name,
        sources=[str(_SOURCE)],
        # -fopenmp: at::parallel_for's threads. The library links libgomp.so.1, which resolves
        # to the copy torch has already loaded (one OpenMP runtime, one thread pool).
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


# torch's builder guards a build folder with a "lock" file and waits, without limit and without
# a word, while it exists: a build interrupted by Ctrl-C or a kill leaves one behind, and every
# later process would wait forever. A lock is live while a process works in the folder (ninja
# and the compiler run there); one left with nobody there is removed, and a live one is waited
# for at most BUILD_WAIT_S seconds before the foreach update is used instead.
BUILD_WAIT_S = float(os.environ.get("SAI_FUSED_BUILD_WAIT_S", "300"))


class BuildLockHeld(RuntimeError):
    """Another process kept building the fused update for longer than ``BUILD_WAIT_S``."""


_LOCK_GRACE_S = 10.0  # torch writes build.ninja before ninja starts: a brand-new lock is live


def _build_directory(name: str) -> Path:
    from torch.utils import cpp_extension

    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False))
    except AttributeError:  # a torch without the private helper: its documented default
        return Path(cpp_extension.get_default_build_root()) / name


def _wait_for_build_lock(folder: Path, wait_s: float | None = None) -> None:
    """Return once ``folder/lock`` is gone or removed as stale.

    Raises:
        BuildLockHeld: another process is still building after ``wait_s`` seconds (default
            ``BUILD_WAIT_S``).
    """
    lock = folder / "lock"
    deadline = time.monotonic() + (BUILD_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > _LOCK_GRACE_S and not _someone_works_in(folder):
            print(f"SGD-SaI: removing {lock}, left by an interrupted build (no process is "
                  "building there); building the fused update again", file=sys.stderr)  # fmt: skip
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            return
        if time.monotonic() > deadline:
            raise BuildLockHeld(
                f"another process has held {lock} for {age:.0f} s; not waiting longer"
            )
        time.sleep(0.5)


def _someone_works_in(folder: Path) -> bool:
    """A live process has its working folder in ``folder`` (Linux's /proc; elsewhere assume
    so, and the lock is waited for)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    target = str(folder.resolve())
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = os.readlink(entry / "cwd")
            if cwd == target or cwd.startswith(target + os.sep):
                return True
    return False
