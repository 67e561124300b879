"""What the lite runtime can run, decided from config.json and the safetensors header
alone (nothing is loaded): `dfplan generate --runtime auto` asks this before choosing."""
from __future__ import annotations

import json
from pathlib import Path

from .. import hugepages
from ..config import Mamba2Config
from ..errors import DfplanError
from ..packed_files import CONFIG, MANIFEST, WEIGHTS


def config_unsupported(cfg: Mamba2Config) -> str | None:
    """Why the architecture is not the lite runtime's (None: it is)."""
    why = []
    if cfg.attn_layer_idx:
        why.append("attention layers")
    if cfg.d_intermediate:
        why.append("MLP blocks")
    if not cfg.tie_embeddings:
        why.append("an untied lm_head")
    if not cfg.residual_in_fp32:
        why.append("a residual stream that is not fp32")
    if why:
        return f"the lite runtime runs pure Mamba-2 models with a tied head; this one has {', '.join(why)}"
    return None


def unsupported(path) -> str | None:
    """Why the lite runtime cannot run `path` (None: it can), from the config and the
    safetensors header alone: nothing is loaded."""
    d = Path(path).expanduser()
    if not (d.is_dir() and (d / MANIFEST).exists()):
        return "not a packed artifact"
    try:
        raw = json.loads((d / CONFIG).read_text())
        cfg = Mamba2Config.from_dict(raw["dfplan_config"], name=raw.get("name", d.name))
        why = config_unsupported(cfg)
        if why:
            return why
        _, h = hugepages.safetensors_index(d / WEIGHTS)
    except (OSError, KeyError, TypeError, ValueError, DfplanError) as e:
        return str(e)
    return header_unsupported(h, cfg)


_BINARY_PARTS = {"bits", "row_scale", "col_scale", "col_shift", "u", "v", "u_scale", "v_scale", "bias"}
_INTN_PARTS = {"qweight", "scale", "bias"}


def intn_bits(info: dict, rows: int, n: int) -> int | None:
    """Bits per code of a row-wise symmetric IntN `qweight` of (rows, n) values, from its
    stored dtype and shape (int8 as is; 2/3/4-bit codes packed into ceil(n * bits / 8) bytes)."""
    shape = info.get("shape")
    if info.get("dtype") == "I8" and shape == [rows, n]:
        return 8
    if info.get("dtype") == "U8" and shape and len(shape) == 2 and shape[0] == rows:
        for b in (2, 3, 4):
            if (n * b + 7) // 8 == shape[1]:
                return b
    return None


def _intn_unsupported(h: dict, p: str, rows: int, n: int) -> str | None:
    """Why the IntN unit `p` (qweight, scale[, bias]) is not row-wise symmetric IntN."""
    parts = {k[len(p) + 1:] for k in h if k.startswith(p + ".")}
    if parts - _INTN_PARTS:      # a zero point (asymmetric) or anything else
        return f"{p} is not symmetric IntN (it has {sorted(parts - _INTN_PARTS)})"
    if intn_bits(h.get(p + ".qweight", {}), rows, n) is None:
        return f"{p} is not 1-bit or row-wise IntN (2/3/4/8 bits)"
    if h.get(p + ".scale", {}).get("shape") != [rows]:
        return f"{p} is grouped IntN (one scale per group, not per row)"
    return None


_FLOAT = ("F32", "F16", "BF16")


def _float_unsupported(h: dict, p: str, rows: int, n: int) -> str | None:
    """Why the float unit `p` (weight[, bias]) is not one the lite runtime reads."""
    parts = {k[len(p) + 1:] for k in h if k.startswith(p + ".")}
    w = h[p + ".weight"]
    if parts - {"weight", "bias"} or w["dtype"] not in _FLOAT or w["shape"] != [rows, n]:
        return f"{p} is a float weight the lite runtime does not read ({w['dtype']} {w['shape']})"
    return None


def header_unsupported(h: dict, cfg: Mamba2Config) -> str | None:
    """What in a safetensors header the lite runtime cannot run (None: nothing). The loader
    relies on it: every tensor it reads has the dtype and shape checked here."""
    if "backbone.norm_f.weight" not in h:
        return "no backbone.norm_f.weight: not a Mamba-2 artifact"
    if "backbone.embedding.weight" in h:
        why = _float_unsupported(h, "backbone.embedding", cfg.vocab_padded, cfg.d_model)
    else:
        why = _intn_unsupported(h, "backbone.embedding", cfg.vocab_padded, cfg.d_model)
    if why:
        return why
    widths = {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner)}
    for i in range(cfg.n_layer):
        for proj, (rows, n) in widths.items():
            p = f"backbone.layers.{i}.mixer.{proj}"
            if p + ".weight" in h:
                why = _float_unsupported(h, p, rows, n)
                if why:
                    return why
                continue
            if p + ".qweight" in h:
                why = _intn_unsupported(h, p, rows, n)
                if why:
                    return why
                continue
            bits = h.get(p + ".bits", {})
            if bits.get("dtype") != "U8":
                return f"{p} is neither 1-bit, IntN nor float"
            if bits.get("shape") != [rows, (n + 7) // 8]:
                return f"{p}.bits is {bits.get('shape')}, not [{rows}, {(n + 7) // 8}]"
            u, v = h.get(p + ".u"), h.get(p + ".v")
            if (u is None) != (v is None) or u and not (
                    u["dtype"] == v["dtype"] == "I8" and len(u["shape"]) == 2 and u["shape"][0] == rows
                    and v["shape"] == [u["shape"][1], n]):
                return f"{p}'s low-rank correction is not int8 (rank bits < 8)"
            extra = {k[len(p) + 1:] for k in h if k.startswith(p + ".")} - _BINARY_PARTS
            if extra:
                return f"{p} has tensors the lite runtime does not read: {sorted(extra)}"
    return None
