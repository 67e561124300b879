"""A packed directory's files and manifest, without torch (dfplan/packed.py loads the model;
the torch-free runtime, dfplan/lite, reads the same directory through these)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DfplanError
from .fileio import sha256_file

PACKED_FORMAT = "dfplan-packed"
PACKED_VERSION = 1
WEIGHTS, CONFIG, PLAN, TOKENIZER, MANIFEST = ("model.safetensors", "config.json", "plan.json",
                                              "tokenizer.json", "manifest.json")


def read_manifest(d: Path) -> dict:
    path = d / MANIFEST
    if not path.exists():
        raise DfplanError(f"{path} is missing: {d} is not a packed dfplan checkpoint (or its save was interrupted)")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DfplanError(f"{path} is corrupt ({e}); re-save the checkpoint") from None
    if not isinstance(m, dict) or m.get("format") != PACKED_FORMAT or not isinstance(m.get("files"), dict):
        raise DfplanError(f"{path} is not a dfplan packed manifest")
    if int(m.get("version", 0)) > PACKED_VERSION:
        raise DfplanError(f"{path}: packed version {m['version']} is newer than this dfplan reads "
                          f"({PACKED_VERSION}); upgrade dfplan")
    for f in (WEIGHTS, CONFIG, PLAN):
        if f not in m["files"]:
            raise DfplanError(f"{path} does not list {f}; re-save the checkpoint")
    return m


def verify_packed(d: str | os.PathLike) -> dict:
    """Check every file the manifest lists (presence, size, sha256); returns the manifest."""
    d = Path(d)
    if not d.is_dir():
        raise DfplanError(f"packed checkpoint directory {d} does not exist")
    m = read_manifest(d)
    for name, info in m["files"].items():
        f = d / name
        if not f.exists():
            raise DfplanError(f"{f} is missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != info.get("bytes"):
            raise DfplanError(f"{f} is {size:,} bytes but {MANIFEST} records {info.get('bytes'):,}: "
                              f"the file is truncated or was replaced")
        if sha256_file(f) != info.get("sha256"):
            raise DfplanError(f"{f} fails its sha256 check: the file is corrupt or was modified")
    return m
