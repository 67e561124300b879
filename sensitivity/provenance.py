"""Fingerprints and environment facts recorded with every sensitivity table."""
from __future__ import annotations

import hashlib
import json
import platform

import numpy as np
import torch

from dfplan.provenance import git_commit as _git_commit
from dfplan.provenance import library_versions


def model_fingerprint(model) -> str:
    """sha256 over every state_dict tensor (name, dtype, shape, bytes): same weights, same hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def windows_hash(windows) -> str:
    w = np.ascontiguousarray(np.asarray(windows, dtype=np.int64))
    return hashlib.sha256(str(w.shape).encode() + w.tobytes()).hexdigest()


def git_commit() -> str | None:
    return _git_commit(mark_dirty=True)


def versions() -> dict:
    return {**library_versions("pandas", "scipy"), "platform": platform.platform(),
            "threads": torch.get_num_threads()}
