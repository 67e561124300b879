"""The kernel build cache: a dead builder's lock never blocks, a live one is waited for with a
message, a killed build leaves nothing that looks finished, a failed build falls back once."""
import os
import socket
import subprocess
import sys
import time
import warnings

import pytest

from dfplan.kernels import build


def _sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.cpp").write_text("// a\n")
    (src / "a.h").write_text("// h\n")
    return [src / "a.cpp"], [src / "a.h"]


def _fake_compile(calls):
    """Stands in for the compiler: writes a file where the .so goes and returns a marker."""
    def compile_fn(name, sources, flags, build_dir):
        calls.append(build_dir)
        assert build_dir.name.endswith(f".tmp-{os.getpid()}")   # never into the shared folder
        (build_dir / f"{name}.so").write_bytes(b"not really a library")
        return ("built", build_dir)
    return compile_fn


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_from_dead_pid_does_not_block(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_KERNEL_LOCK_TIMEOUT", "3600")
    srcs, hdrs = _sources(tmp_path)
    root = tmp_path / "cache"
    root.mkdir()
    key = build.build_key(srcs + hdrs, ["-O3"], "t")
    lock = root / f"{key}.lock"
    dead = _dead_pid()
    lock.write_text(f"{dead} {socket.gethostname()} {time.time():.3f}\n")   # fresh, but its owner died
    (root / f"{key}.tmp-{dead}").mkdir()                                  # the killed build's leftovers
    msgs, calls = [], []
    t0 = time.monotonic()
    mod = build.load_or_build("ext", srcs, hdrs, ["-O3"], "t", say=msgs.append, root=root,
                              compile_fn=_fake_compile(calls))
    assert time.monotonic() - t0 < 5
    assert mod[0] == "built" and len(calls) == 1
    assert (root / key / "ext.so").exists()
    assert not lock.exists() and not list(root.glob("*.tmp-*"))
    assert any("stale" in m for m in msgs) and any("compiling CPU kernels" in m for m in msgs)


def test_old_lock_is_broken_even_if_pid_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_KERNEL_LOCK_TIMEOUT", "60")
    srcs, hdrs = _sources(tmp_path)
    root = tmp_path / "cache"
    root.mkdir()
    key = build.build_key(srcs + hdrs, [], "t")
    (root / f"{key}.lock").write_text(f"{os.getppid()} {socket.gethostname()} {time.time() - 120:.3f}\n")
    calls = []
    build.load_or_build("ext", srcs, hdrs, [], "t", say=lambda m: None, root=root,
                        compile_fn=_fake_compile(calls))
    assert len(calls) == 1


def test_live_lock_is_waited_for_with_a_message(tmp_path, monkeypatch):
    """Another live process builds: we print who we wait for, then use its result."""
    monkeypatch.setattr(build, "_WAIT_NOTE_S", 0.2)
    monkeypatch.setattr(build, "_POLL_S", 0.05)
    srcs, hdrs = _sources(tmp_path)
    root = tmp_path / "cache"
    root.mkdir()
    key = build.build_key(srcs + hdrs, [], "t")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (root / f"{key}.lock").write_text(f"{holder.pid} {socket.gethostname()} {time.time():.3f}\n")
        msgs, loaded = [], []

        def say(m):
            msgs.append(m)
            if len(msgs) == 2:                         # the other process finishes its build
                (root / key).mkdir()
                (root / key / "ext.so").write_bytes(b"x")
                (root / f"{key}.lock").unlink()
        monkeypatch.setattr(build, "load_module", lambda name, so: loaded.append(so) or "loaded")
        out = build.load_or_build("ext", srcs, hdrs, [], "t", say=say, root=root,
                                  compile_fn=lambda *a: pytest.fail("must not compile"))
    finally:
        holder.kill()
        holder.wait()
    assert out == "loaded" and loaded == [root / key / "ext.so"]
    assert sum(f"pid {holder.pid}" in m and "still waiting" in m for m in msgs) >= 2


def test_failed_build_leaves_no_finished_folder(tmp_path):
    srcs, hdrs = _sources(tmp_path)
    root = tmp_path / "cache"

    def boom(name, sources, flags, build_dir):
        (build_dir / "half.o").write_bytes(b"")
        raise RuntimeError("no compiler")
    with pytest.raises(RuntimeError, match="no compiler"):
        build.load_or_build("ext", srcs, hdrs, [], "t", say=lambda m: None, root=root, compile_fn=boom)
    assert sorted(p.name for p in root.iterdir()) == []          # no lock, no temp, no final


def test_cache_key_depends_on_venv_and_sources(tmp_path, monkeypatch):
    srcs, hdrs = _sources(tmp_path)
    a = build.build_key(srcs + hdrs, [], "t")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "other-venv"))
    b = build.build_key(srcs + hdrs, [], "t")
    monkeypatch.undo()
    srcs[0].write_text("// changed\n")
    c = build.build_key(srcs + hdrs, [], "t")
    assert len({a, b, c}) == 3


def test_cpu_extension_falls_back_with_one_warning(monkeypatch):
    """A build that fails leaves extension() None with a single warning (dispatch then uses ref)."""
    from dfplan.kernels import cpu
    saved = dict(cpu._state)
    cpu._state.clear()
    monkeypatch.setattr(cpu, "_build", lambda: (_ for _ in ()).throw(RuntimeError("compiler exploded")))
    monkeypatch.delenv("DFPLAN_NO_CPP", raising=False)
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert cpu.extension() is None and cpu.extension() is None and not cpu.available()
        assert len([x for x in w if "could not be built" in str(x.message)]) == 1
        assert "compiler exploded" in cpu.build_error()
    finally:
        cpu._state.clear()
        cpu._state.update(saved)
