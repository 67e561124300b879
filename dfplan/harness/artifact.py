"""What a model directory is: its bytes on disk, its plan hash, the context it was trained at."""
from __future__ import annotations

import json
from pathlib import Path

from ..loading import WEIGHT_FILES
from ..packed_files import MANIFEST

ZOO_META = "zoo.json"        # written by `dfplan zoo train` beside the teacher


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def trained_context(model_arg: str) -> int | None:
    """Sequence length the model (or, for a distilled student, its teacher) was trained at;
    None when nothing on disk says."""
    d = Path(model_arg).expanduser()
    if not d.is_dir():
        return None
    meta = _json(d / ZOO_META)
    if meta and isinstance(meta.get("seq_len"), int):
        return meta["seq_len"]
    manifest = _json(d / MANIFEST) or {}
    teacher = ((manifest.get("extra") or {}).get("distill") or {}).get("teacher")
    if isinstance(teacher, str) and Path(teacher).expanduser().resolve() != d.resolve():
        return trained_context(teacher)
    return None


def artifact_info(model_arg: str, model=None) -> dict:
    """Bytes of the weights as stored (the packed payload for a packed artifact), plan hash."""
    d = Path(model_arg).expanduser()
    info = {"path": str(model_arg), "kind": "unknown", "plan_hash": None,
            "payload_bytes": None, "file_bytes": None}
    manifest = getattr(model, "dfplan_manifest", None) or (_json(d / MANIFEST) if d.is_dir() else None)
    if manifest and manifest.get("format") == "dfplan-packed":
        info.update(kind="packed", plan_hash=manifest.get("plan_hash"),
                    payload_bytes=manifest.get("payload_bytes"),
                    file_bytes=sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values()))
    elif d.is_dir():
        files = [d / f for f in WEIGHT_FILES if (d / f).exists()]
        info.update(kind="checkpoint", file_bytes=sum(f.stat().st_size for f in files[:1]) or None)
    if model is not None:
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["tensor_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return info
