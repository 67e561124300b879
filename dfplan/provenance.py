"""Shared provenance helpers: the git commit of this checkout and the library versions, recorded
in every artifact (packed checkpoints, plans, sensitivity tables, benchmark results)."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def git_commit(mark_dirty: bool = False, repo: str | Path | None = None) -> str | None:
    """HEAD of the checkout dfplan runs from (None outside git); with mark_dirty, '+dirty' is
    appended when tracked files have uncommitted changes."""
    root = str(repo or _ROOT)
    try:
        r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if r.returncode != 0 or not r.stdout.strip():
            return None
        head = r.stdout.strip()
        if mark_dirty:
            d = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
            if d.returncode == 0 and d.stdout.strip():
                head += "+dirty"
        return head
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(repo: str | Path | None = None) -> dict:
    """{"commit": HEAD or None, "dirty": bool or None}: what benchmark results record."""
    head = git_commit(repo=repo)
    if head is None:
        return {"commit": None, "dirty": None}
    marked = git_commit(mark_dirty=True, repo=repo) or head
    return {"commit": head, "dirty": marked.endswith("+dirty")}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions(*extra: str) -> dict:
    """Python, dfplan, torch, numpy and the `extra` distributions (None when not installed)."""
    return {"python": platform.python_version(),
            **{n: package_version(n) for n in ("dfplan", "torch", "numpy", *extra)}}
