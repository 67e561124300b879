"""Build the C++ CPU extension once per venv and load it; never wait on a dead builder.

Layout of the cache (`cache_root()`, inside the active venv by default):
  <key>/dfplan_kernels_cpu.so   a finished build: loaded directly, no compiler involved
  <key>.lock                    "pid host start-time" of the process building <key> now
  <key>.tmp-<pid>               that process's private build folder

A build happens in a private temp folder and is renamed onto <key> when it succeeds, so a
finished folder is always complete and a killed build leaves only junk that the next
builder removes. The lock only stops two live processes from compiling the same thing at
once: a lock whose pid is dead (same host) or that is older than `lock_timeout()` is broken.
While waiting for another process's build, a line is printed every `_WAIT_NOTE_S` seconds.

The key hashes the sources, flags, torch + python versions, the compiler's version line,
the machine and the venv prefix: two checkouts with two venvs never share (or fight over)
one folder, and a torch or compiler upgrade builds afresh.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

_WAIT_NOTE_S = 15.0
_POLL_S = 0.5
DEFAULT_LOCK_TIMEOUT_S = 1200.0   # a build on a busy 2-core machine takes minutes, never 20


def cache_root() -> Path:
    """DFPLAN_KERNEL_CACHE, else <venv>/share/dfplan/kernels, else ~/.cache/dfplan/kernels."""
    env = os.environ.get("DFPLAN_KERNEL_CACHE")
    if env:
        return Path(env)
    if sys.prefix != sys.base_prefix:
        venv = Path(sys.prefix) / "share" / "dfplan" / "kernels"
        probe = venv
        while not probe.exists():
            probe = probe.parent
        if os.access(probe, os.W_OK | os.X_OK):
            return venv
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfplan" / "kernels"


def lock_timeout() -> float:
    try:
        return float(os.environ.get("DFPLAN_KERNEL_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT_S))
    except ValueError:
        return DEFAULT_LOCK_TIMEOUT_S


def compiler_id() -> str:
    """First line of `$CXX --version` (torch builds with $CXX or c++); '' when there is none."""
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20)
        return f"{cxx}: {r.stdout.splitlines()[0] if r.stdout else ''}"
    except (OSError, subprocess.SubprocessError):
        return f"{cxx}: missing"


def build_key(files: list[Path], flags: list[str], torch_version: str) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for part in (" ".join(flags), torch_version, sys.version, compiler_id(), platform.machine(),
                 str(Path(sys.prefix).resolve())):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


# -- the lock ------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(lock: Path) -> dict | None:
    """{"pid", "host", "t"} of a lock file, {} when unreadable, None when absent."""
    try:
        parts = lock.read_text().split()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        return {"pid": int(parts[0]), "host": parts[1], "t": float(parts[2])}
    except (IndexError, ValueError):
        return {}


def lock_is_stale(info: dict, lock: Path, timeout: float) -> bool:
    """Dead pid on this host, older than `timeout`, or garbage older than a few seconds."""
    if not info:   # half-written or foreign: trust its mtime only briefly
        try:
            return time.time() - lock.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    if time.time() - info["t"] > timeout:
        return True
    return info["host"] == socket.gethostname() and not _pid_alive(info["pid"])


def try_lock(lock: Path) -> bool:
    """Create `lock` holding this process's pid; False when another process holds it."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n")
    return True


def break_lock(lock: Path, info: dict) -> None:
    """Remove a stale lock, unless it changed hands since we read it."""
    if read_lock(lock) == info:
        lock.unlink(missing_ok=True)


def _clean_tmp(root: Path, key: str) -> None:
    """Remove private build folders whose builder is dead (a killed build's leftovers)."""
    for d in root.glob(f"{key}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


# -- load or build -------------------------------------------------------------------------------

def load_module(name: str, so: Path):
    """Import an already-built extension module from its .so (torch must be imported first)."""
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _compile(name: str, sources: list[Path], flags: list[str], build_dir: Path):
    from torch.utils import cpp_extension
    return cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=flags,
                              build_directory=str(build_dir), verbose=False)


def load_or_build(name: str, sources: list[Path], headers: list[Path], flags: list[str],
                  torch_version: str, say=None, root: Path | None = None, compile_fn=None,
                  loader=None, suffix: str = ".so"):
    """The extension module `name`: loaded from the cache, else compiled (once across processes).

    compile_fn(name, sources, flags, build_dir) compiles into build_dir/<name><suffix> and
    returns the loaded module; loader(name, path) loads a finished build (default: a Python
    extension module; the torch-free library passes ctypes.CDLL). Raises whatever the
    compiler raises; the caller falls back to the reference path.
    """
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    compile_fn = compile_fn or _compile
    load_module_ = loader or load_module
    root = root or cache_root()
    key = build_key(sources + headers, flags, torch_version)
    final, lock = root / key, root / f"{key}.lock"
    so = final / f"{name}{suffix}"
    if so.exists():
        return load_module_(name, so)
    root.mkdir(parents=True, exist_ok=True)
    timeout = lock_timeout()
    waited_note = time.monotonic()
    while not try_lock(lock):
        if so.exists():
            return load_module_(name, so)
        info = read_lock(lock)
        if info is None:
            continue                                   # released between our two looks
        if lock_is_stale(info, lock, timeout):
            say(f"dfplan: removing a stale kernel build lock {lock} (pid {info.get('pid', '?')} "
                "is gone or took too long)")
            break_lock(lock, info)
            continue
        if time.monotonic() - waited_note >= _WAIT_NOTE_S:
            say(f"dfplan: still waiting for another process's build of the CPU kernels "
                f"(pid {info['pid']}, lock {lock})")
            waited_note = time.monotonic()
        time.sleep(_POLL_S)
    try:
        if so.exists():                                # built while we waited for the lock
            return load_module_(name, so)
        _clean_tmp(root, key)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        say(f"dfplan: compiling CPU kernels ({name}) once into {final}")
        t0 = time.monotonic()
        mod = compile_fn(name, sources, flags, tmp)
        if final.exists():                             # a foreign leftover without the .so
            shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)                          # the finished build appears whole
        say(f"dfplan: CPU kernels ({name}) built in {time.monotonic() - t0:.0f} s")
        return mod
    finally:
        if read_lock(lock) and read_lock(lock).get("pid") == os.getpid():
            lock.unlink(missing_ok=True)
        tmp_dir = root / f"{key}.tmp-{os.getpid()}"
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)
