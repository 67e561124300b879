"""Row / column slices of linear layers, in their own format (float, IntN, packed 1-bit).

The slice is a new module of the same kind holding only the kept rows (outputs) and columns
(inputs), so the same kernels run on a smaller weight. Packed payloads are sliced as stored:
1-bit sign rows are gathered byte for byte; columns move whole bytes when the kept columns
are aligned groups of 8 (SSM heads and channel blocks of 8k always are), otherwise they are
unpacked and repacked once. Sub-8-bit IntN codes and low-rank factors are repacked likewise.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dfplan.errors import DfplanError
from dfplan.formats import quant
from dfplan.formats.modules import BinaryLinear, IntNLinear
from dfplan.kernels.packing import pack_signs, unpack_signs


def _rows(t: torch.Tensor | None, rows: torch.Tensor | None):
    return t if t is None or rows is None else t.index_select(0, rows.to(t.device)).contiguous()


def _byte_blocks(cols: torch.Tensor, in_features: int) -> torch.Tensor | None:
    """Byte indices when `cols` is exactly a sorted union of whole aligned bytes, else None."""
    if cols.numel() % 8 or in_features % 8:
        return None
    blocks = cols.reshape(-1, 8)
    start = blocks[:, 0]
    if start.remainder(8).any() or not torch.equal(blocks, start[:, None] + torch.arange(8)):
        return None
    return start // 8


def _slice_sign_cols(bits: torch.Tensor, in_features: int, cols: torch.Tensor) -> torch.Tensor:
    byte_idx = _byte_blocks(cols, in_features)
    if byte_idx is not None:
        return bits.index_select(1, byte_idx.to(bits.device)).contiguous()
    S = unpack_signs(bits, in_features, torch.float32)
    return pack_signs(S.index_select(1, cols.to(S.device)))


def _slice_codes_cols(stored: torch.Tensor, n: int, bits: int, symmetric: bool,
                      cols: torch.Tensor) -> torch.Tensor:
    """IntN codes packed along the input dimension: keep `cols` of each row."""
    if bits == 8:
        return stored.index_select(1, cols.to(stored.device)).contiguous()
    q = quant.unpack_intn(stored, n, bits, symmetric)
    return quant.pack_intn(q.index_select(1, cols.to(q.device)), bits, symmetric)


def _new_like(mod, out_f: int, in_f: int):
    has_bias = mod.bias is not None
    return type(mod).empty(mod.spec, (out_f, in_f), bias=has_bias, device=mod.bits.device
                           if isinstance(mod, BinaryLinear) else mod.qweight.device,
                           compute_dtype=mod.compute_dtype)


def _slice_binary(mod: BinaryLinear, rows, cols) -> BinaryLinear:
    s, n_in = mod.spec, mod.in_features
    out_f = mod.out_features if rows is None else rows.numel()
    in_f = n_in if cols is None else cols.numel()
    if s.rank > min(out_f, in_f):
        raise DfplanError(f"slicing {s.name} to ({out_f}, {in_f}) leaves fewer rows/columns than "
                          f"its rank {s.rank}; keep more units")
    new = _new_like(mod, out_f, in_f)
    bits = _rows(mod.bits, rows)
    new.bits = bits if cols is None else _slice_sign_cols(bits, n_in, cols)
    if s.scale == "row":
        new.row_scale = _rows(mod.row_scale, rows)
    else:
        new.col_scale = mod.col_scale if cols is None else mod.col_scale[cols].contiguous()
        new.col_shift = mod.col_shift if cols is None else mod.col_shift[cols].contiguous()
    if s.rank:
        new.u = _rows(mod.u, rows)
        new.u_scale = _rows(mod.u_scale, rows)
        new.v = mod.v if cols is None else _slice_codes_cols(mod.v, n_in, s.rank_bits, True, cols)
        new.v_scale = mod.v_scale
    if mod.bias is not None:
        new.bias = _rows(mod.bias, rows)
    return new


def _whole_groups(cols: torch.Tensor, group: int, name: str) -> torch.Tensor:
    """Group indices when `cols` is a sorted union of whole aligned groups; else DfplanError."""
    g = cols.reshape(-1, group) if cols.numel() % group == 0 else None
    if g is None or g[:, 0].remainder(group).any() or not torch.equal(g, g[:, :1] + torch.arange(group)):
        raise DfplanError(f"{name}: kept columns must be whole groups of {group}; "
                          "use a unit width that is a multiple of the group size")
    return g[:, 0] // group


def _slice_intn(mod: IntNLinear, rows, cols) -> IntNLinear:
    s, n_in = mod.spec, mod.in_features
    out_f = mod.out_features if rows is None else rows.numel()
    in_f = n_in if cols is None else cols.numel()
    gi = _whole_groups(cols, s.group, s.name) if cols is not None and s.group else None
    new = _new_like(mod, out_f, in_f)
    q = _rows(mod.qweight, rows)
    scale, zero = _rows(mod.scale, rows), _rows(getattr(mod, "zero", None), rows)
    if cols is not None:
        q = _slice_codes_cols(q, n_in, s.bits, s.symmetric, cols)
        if gi is not None:        # whole groups: their scales (and zeros) move with them
            scale = scale.index_select(1, gi.to(scale.device)).contiguous()
            zero = None if zero is None else zero.index_select(1, gi.to(zero.device)).contiguous()
    new.qweight, new.scale = q, scale
    if zero is not None:
        new.zero = zero
    if mod.bias is not None:
        new.bias = _rows(mod.bias, rows)
    return new


@torch.no_grad()
def slice_linear(mod: nn.Module, rows: torch.Tensor | None = None,
                 cols: torch.Tensor | None = None) -> nn.Module:
    """A new linear computing mod's outputs `rows` from its inputs `cols` (sorted int64 indices;
    None keeps all). Float, IntNLinear and BinaryLinear keep their format."""
    if isinstance(mod, BinaryLinear):
        return _slice_binary(mod, rows, cols)
    if isinstance(mod, IntNLinear):
        return _slice_intn(mod, rows, cols)
    if isinstance(mod, nn.Linear):
        w = _rows(mod.weight, rows)
        if cols is not None:
            w = w.index_select(1, cols.to(w.device))
        new = nn.Linear(w.shape[1], w.shape[0], bias=mod.bias is not None, device="meta",
                        dtype=w.dtype)
        new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        if mod.bias is not None:
            new.bias = nn.Parameter(_rows(mod.bias, rows).clone(), requires_grad=False)
        return new
    raise DfplanError(f"cannot slice a {type(mod).__name__}; dynamic support needs nn.Linear, "
                      "IntNLinear or BinaryLinear projections")
