"""Packed checkpoints: the compressed model as shipped, and loading it back without FP weights.

A packed directory holds
  model.safetensors  every payload tensor (specs.py layouts) + fixed tensors in the plan's
                     default dtype; keys are the model's state_dict keys;
  config.json        {"format": "dfplan-packed", "name": ..., "dfplan_config": Mamba2Config.to_dict()};
  plan.json          the Plan (formats/plan.py schema);
  tokenizer.json     optional;
  manifest.json      written last: sha256 + size of every file above, payload bytes, plan hash,
                     compute dtype, versions, git commit.
Each file is written to a temp file and renamed; the old manifest is removed first, so an
interrupted save never leaves a directory that verifies. load_packed checks sizes and sha256
before parsing anything, builds the model on the meta device, swaps in empty compressed
modules and assign-loads the tensors: no FP teacher weights are ever materialised.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .config import Mamba2Config
from .errors import DfplanError
from .fileio import atomic_path, sha256_file, write_json_atomic
from .formats.apply import compressed_modules, prepare_empty
from .formats.plan import Plan
from .formats.size import layout_bytes, packed_layout
from .formats.specs import Keep
from .formats.units import compressible_units
from .hugepages import read_tensors
from .model import build_model
from .packed_files import (
    CONFIG,
    MANIFEST,
    PACKED_FORMAT,
    PACKED_VERSION,
    PLAN,
    TOKENIZER,
    WEIGHTS,
    read_manifest,
    verify_packed,
)
from .provenance import git_commit, library_versions


def _compressed_keys(cfg: Mamba2Config, resolved: dict) -> set[str]:
    """state_dict keys of payload tensors of non-Keep units (stored and loaded as-is)."""
    keys = set()
    for u in compressible_units(cfg):
        spec = resolved[u.name]
        if not isinstance(spec, Keep):
            keys.update(f"{u.name}.{t.name}" for t in spec.payload(u.shape))
    return keys


def _float_dtype(model: nn.Module) -> torch.dtype:
    p = getattr(getattr(model, "backbone", None), "norm_f", None)
    return p.weight.dtype if p is not None else torch.float32


def packed_tensors(model: nn.Module, plan) -> dict[str, torch.Tensor]:
    """The exact tensors save_packed writes (CPU, contiguous); validates model against plan."""
    cfg = model.config
    layout = packed_layout(cfg, plan)               # resolves + validates the plan
    resolved = plan.resolve(cfg)
    for name, mod in compressed_modules(model).items():
        if resolved.get(name) != mod.spec:
            raise DfplanError(f"{name} holds {mod.spec} but the plan gives it {resolved.get(name)}; "
                              f"save with the plan the model was compressed with")
    sd = model.state_dict()
    missing, extra = sorted(set(layout) - set(sd)), sorted(set(sd) - set(layout))
    if missing or extra:
        raise DfplanError(f"model does not match its plan: missing {missing[:4]}, unexpected {extra[:4]} "
                          f"(apply_plan the plan before saving)")
    compressed = _compressed_keys(cfg, resolved)
    out = {}
    for k, (shape, dtype) in layout.items():
        t = sd[k].detach()
        if tuple(t.shape) != tuple(shape):
            raise DfplanError(f"{k} has shape {tuple(t.shape)}, the plan stores {shape}")
        want = getattr(torch, dtype)
        if k in compressed:
            if t.dtype != want:
                raise DfplanError(f"{k} is {t.dtype}, the format stores {want}")
        elif not t.is_floating_point():
            raise DfplanError(f"{k} is {t.dtype}; a kept tensor must be floating point")
        out[k] = t.to(device="cpu", dtype=want).contiguous()
    return out


def save_packed(model: nn.Module, plan=None, out_dir: str | os.PathLike | None = None, *,
                tokenizer=None, extra: dict | None = None) -> Path:
    """Write the packed checkpoint of a model compressed with `plan` (default: the plan
    apply_plan recorded on the model). Everything is validated before the first write."""
    if out_dir is None:
        raise DfplanError("save_packed needs an output directory")
    plan = plan if plan is not None else getattr(model, "dfplan_plan", None)
    if plan is None:
        raise DfplanError("save_packed needs the plan the model was compressed with")
    cfg: Mamba2Config = model.config
    tensors = packed_tensors(model, plan)
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    accounted = layout_bytes(packed_layout(cfg, plan))
    if payload != accounted:      # cannot happen unless specs.py and the modules disagree
        raise RuntimeError(f"payload {payload} B != accounted {accounted} B")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DfplanError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)       # never leave a stale manifest over new files
    from safetensors.torch import save_file
    with atomic_path(out / WEIGHTS) as tmp:
        # one metadata key only: safetensors writes metadata in hash-map order, so several keys
        # would make identical models give different bytes (the manifest carries the rest)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / CONFIG, {"format": PACKED_FORMAT, "name": cfg.name,
                                     "dfplan_config": cfg.to_dict()})
    plan.to_json(out / PLAN)
    files = [WEIGHTS, CONFIG, PLAN]
    if tokenizer is not None:
        with atomic_path(out / TOKENIZER) as tmp:
            tokenizer.save(str(tmp))
        files.append(TOKENIZER)
    else:
        (out / TOKENIZER).unlink(missing_ok=True)   # a stale tokenizer would not match
    manifest = {
        "format": PACKED_FORMAT, "version": PACKED_VERSION,
        "files": {f: {"sha256": sha256_file(out / f), "bytes": (out / f).stat().st_size} for f in files},
        "payload_bytes": payload, "n_tensors": len(tensors), "plan_hash": plan.hash(),
        "compute_dtype": str(_float_dtype(model)).removeprefix("torch."),
        "model": cfg.name, "versions": library_versions("safetensors"), "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **({"extra": extra} if extra else {}),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return out


def read_packed_config(d: Path) -> Mamba2Config:
    path = d / CONFIG
    try:
        raw = json.loads(path.read_text())
        return Mamba2Config.from_dict(raw["dfplan_config"], name=raw.get("name", d.name))
    except DfplanError as e:
        raise DfplanError(f"{path}: {e}") from None
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise DfplanError(f"{path} is not a packed dfplan config ({type(e).__name__}: {e})") from None


def _read_in_full(cfg: Mamba2Config, layout: dict) -> list[str]:
    """The tensors a decode step reads in full: all of them but an untied embedding, of
    which decode reads only its tokens' rows (the file mmap keeps the rest off the resident
    set). These are read into huge pages (dfplan.hugepages), the small ones too, so that no
    file mapping stays behind the model (whose fault-around would map neighbouring payload
    pages a second time)."""
    return [k for k in layout if cfg.tie_embeddings or not k.startswith("backbone.embedding.")]


def load_packed(path: str | os.PathLike, dtype: torch.dtype | None = None, device=None,
                verify: bool = True) -> nn.Module:
    """Rebuild the compressed model from a packed directory (checksums verified first).

    dtype: compute dtype of kept float tensors (default: the dtype the model was saved from);
    compressed payloads keep their stored dtypes. Returns the model in eval mode.
    """
    from safetensors import SafetensorError, safe_open

    d = Path(path)
    m = verify_packed(d) if verify else read_manifest(d)
    cfg = read_packed_config(d)
    plan = Plan.from_json(d / PLAN)
    if m.get("plan_hash") and plan.hash() != m["plan_hash"]:
        raise DfplanError(f"{d / PLAN} does not match the plan hash in {MANIFEST}")
    compute = dtype or getattr(torch, m.get("compute_dtype", "float32"))
    layout = packed_layout(cfg, plan)
    compressed = _compressed_keys(cfg, plan.resolve(cfg))
    try:
        with safe_open(str(d / WEIGHTS), "pt") as f:
            stored = set(f.keys())
            missing, extra = sorted(set(layout) - stored), sorted(stored - set(layout))
            if missing or extra:
                raise DfplanError(f"{d / WEIGHTS} does not match its plan: missing {missing[:4]}, "
                                  f"unexpected {extra[:4]}")
            sd = read_tensors(d / WEIGHTS, _read_in_full(cfg, layout)) \
                if device is None or torch.device(device).type == "cpu" else {}
            sd.update({k: f.get_tensor(k) for k in layout if k not in sd})
    except (SafetensorError, OSError, ValueError) as e:
        raise DfplanError(f"{d / WEIGHTS} cannot be read as safetensors ({e})") from None
    for k, (shape, dt) in layout.items():
        t = sd[k]
        if tuple(t.shape) != tuple(shape) or t.dtype != getattr(torch, dt):
            raise DfplanError(f"{d / WEIGHTS}: {k} is {t.dtype} {tuple(t.shape)}, the plan stores {dt} {shape}")
        if k not in compressed:
            sd[k] = t.to(compute)
    model = build_model(cfg, device="meta")
    prepare_empty(model, plan, compute_dtype=compute)
    model.load_state_dict(sd, strict=True, assign=True)
    if device is not None:
        model.to(device)
    model.dfplan_manifest = m
    return model.eval()
