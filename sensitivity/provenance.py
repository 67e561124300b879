"""Fingerprints and environment facts recorded with every sensitivity table."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def model_fingerprint(model) -> str:
    """sha256 over every state_dict tensor (name, dtype, shape, bytes): same weights, same hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.to_mamba_ssm_dict(), sort_keys=True).encode()).hexdigest()


def windows_hash(windows) -> str:
    w = np.ascontiguousarray(np.asarray(windows, dtype=np.int64))
    return hashlib.sha256(str(w.shape).encode() + w.tobytes()).hexdigest()


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    return out.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def versions() -> dict:
    from importlib import metadata

    def ver(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
            "pandas": ver("pandas"), "scipy": ver("scipy"), "dfplan": ver("dfplan"),
            "platform": platform.platform(), "threads": torch.get_num_threads()}
