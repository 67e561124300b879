"""Built-in layouts: named plans a user can size, apply or compare without a search.

dfssm is the DF-SSM paper's layout: 1-bit in_proj / out_proj with fp16 row scales, rank-16 int8
corrections on every in_proj and out_proj, int8 row-wise tied embedding, everything else fp16.
Attention layers of hybrid models and MLPs are not in the paper; its layouts leave them fp16.
"""
from __future__ import annotations

from ..config import Mamba2Config
from ..errors import DfplanError
from .plan import Plan, model_signature
from .specs import Binary, IntN, Keep, Spec
from .units import compressible_units

MAMBA_KINDS = ("in_proj", "out_proj")
ALL_LINEARS = ("in_proj", "out_proj", "attn_in", "attn_out", "fc1", "fc2")
HEADS = ("embedding", "lm_head")

# name -> (description, {unit kind: spec}, default dtype)
_LAYOUTS: dict[str, tuple[str, dict, str]] = {
    "fp32": ("everything fp32", {}, "fp32"),
    "bf16": ("everything bf16", {}, "bf16"),
    "fp16": ("everything fp16 (the usual released checkpoint)", {}, "fp16"),
    "int8": ("int8 row-wise linears and embedding, rest fp16",
             {**{k: IntN(8) for k in ALL_LINEARS}, **{k: IntN(8) for k in HEADS}}, "fp16"),
    "int4": ("int4 row-wise linears (clip-searched), int8 embedding, rest fp16",
             {**{k: IntN(4) for k in ALL_LINEARS}, **{k: IntN(8) for k in HEADS}}, "fp16"),
    "dfssm": ("DF-SSM: 1-bit in_proj/out_proj + rank-16 int8 corrections, int8 embedding, rest fp16",
              {**{k: Binary("row", 16, 8) for k in MAMBA_KINDS}, **{k: IntN(8) for k in HEADS}}, "fp16"),
    "dfssm-scaffold": ("DF-SSM scaffold only: 1-bit in_proj/out_proj, int8 embedding, rest fp16",
                       {**{k: Binary("row") for k in MAMBA_KINDS}, **{k: IntN(8) for k in HEADS}}, "fp16"),
    "bimamba": ("Bi-Mamba: FBI-Linear in_proj/out_proj, rest fp16",
                {k: Binary("fbi") for k in MAMBA_KINDS}, "fp16"),
}


def layout_names() -> list[str]:
    return list(_LAYOUTS)


def describe_layouts() -> dict[str, str]:
    return {k: v[0] for k, v in _LAYOUTS.items()}


def layout_kinds(name: str) -> tuple[dict[str, Spec], Keep]:
    if name not in _LAYOUTS:
        raise DfplanError(f"unknown layout {name!r}; choose one of: {', '.join(_LAYOUTS)}")
    _, kinds, default = _LAYOUTS[name]
    return dict(kinds), Keep(default)


def layout_plan(name: str, cfg: Mamba2Config):
    """The built-in layout `name` as a Plan for `cfg` (explicit unit names)."""
    kinds, default = layout_kinds(name)
    specs = {u.name: kinds[u.kind] for u in compressible_units(cfg) if u.kind in kinds}
    return Plan(specs=specs, default=default, model=model_signature(cfg), solver=f"layout:{name}",
                notes=_LAYOUTS[name][0])
