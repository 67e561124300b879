"""Shared provenance helpers: the git commit of this checkout, recorded in every artifact."""
from __future__ import annotations

import subprocess
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
