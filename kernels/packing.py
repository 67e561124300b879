"""The one bit layout every 1-bit tensor in dfplan uses.

Sign matrix S (out, in) with entries +1 / -1 is stored as uint8 `bits` (out, ceil(in / 8)):
  - row-major, one packed row per output row (GEMV reads one contiguous row per output);
  - LSB first: column j lives in byte j // 8, bit j % 8 (value 1 << (j % 8));
  - bit 1 means +1, bit 0 means -1;
  - an exact zero weight packs as +1 (sign(0) := +1, so no third level appears);
  - padding bits past `in` are 0 and must be ignored by every consumer
    (kernels either mask them or multiply them by zero-padded activations).

The CPU runtime may keep the same bytes in a second order, "row blocks" (ROW_BLOCKS), for the
one-token lookup kernel (csrc/linear_cpu.cpp): rows in blocks of 64, and inside a block
column byte j of all its rows together, so byte j of row o0 + r sits at flat offset
o0 * nb + j * h + r (h = rows in the block: 64, or fewer in the last one). It is an in-memory
order only: files, state_dicts and every other consumer see the row-major layout above.
"""
from __future__ import annotations

import torch

_BIT_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)  # (8,)


def packed_cols(in_features: int) -> int:
    return (in_features + 7) // 8


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """(out, in) float -> (out, ceil(in/8)) uint8, bit = (w >= 0)."""
    if w.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    pad = packed_cols(in_f) * 8 - in_f
    pos = (w >= 0).to(torch.uint8)
    if pad:
        pos = torch.nn.functional.pad(pos, (0, pad))  # padding bits are 0
    pos = pos.view(out_f, -1, 8)
    return (pos * _BIT_WEIGHTS.to(w.device)).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(bits: torch.Tensor, in_features: int, dtype=torch.float32) -> torch.Tensor:
    """(out, ceil(in/8)) uint8 -> (out, in) of +1/-1 in `dtype`. Reference only: slow."""
    if bits.dtype != torch.uint8 or bits.dim() != 2:
        raise ValueError(f"unpack_signs expects 2-D uint8 bits, got {bits.dtype} {tuple(bits.shape)}")
    if bits.shape[1] != packed_cols(in_features):
        raise ValueError(
            f"packed width {bits.shape[1]} does not match in_features={in_features} "
            f"(expected {packed_cols(in_features)} bytes per row)"
        )
    w = _BIT_WEIGHTS.to(bits.device)
    b = (bits.unsqueeze(-1) & w).ne(0)  # (out, cols, 8)
    b = b.reshape(bits.shape[0], -1)[:, :in_features]
    return b.to(dtype) * 2 - 1


ROWS, ROW_BLOCKS = 0, 1     # layout codes the C++ kernel takes
BLOCK_ROWS = 64


def _blocks(out_f: int):
    for o0 in range(0, out_f, BLOCK_ROWS):
        yield o0, min(out_f, o0 + BLOCK_ROWS)


def to_row_blocks(bits: torch.Tensor) -> torch.Tensor:
    """(out, nb) row-major bits -> the same bytes in row-block order (same shape, new tensor)."""
    return to_row_blocks_(bits.clone())


def from_row_blocks(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of to_row_blocks: row-block order -> (out, nb) row-major (new tensor)."""
    return from_row_blocks_(bits.clone())


def to_row_blocks_(bits: torch.Tensor) -> torch.Tensor:
    """to_row_blocks in place, one block (64 x nb bytes) at a time: no matrix-sized
    temporary (a freed multi-MB buffer would also raise glibc's mmap threshold, and the
    prefill's scratch would then stay on the heap)."""
    if not _reorder_in_cpp(bits, True):
        reorder_torch_(bits, True)
    return bits


def from_row_blocks_(bits: torch.Tensor) -> torch.Tensor:
    """from_row_blocks in place, block by block."""
    if not _reorder_in_cpp(bits, False):
        reorder_torch_(bits, False)
    return bits


def reorder_torch_(bits: torch.Tensor, to_blocks: bool) -> torch.Tensor:
    """The pure-torch reorder (any device; the C++ kernels' self-check compares with it)."""
    out_f, nb = bits.shape
    flat = bits.view(-1)
    for o0, o1 in _blocks(out_f):
        if to_blocks:
            flat[o0 * nb:o1 * nb] = bits[o0:o1].t().contiguous().view(-1)       # (nb, h)
        else:
            bits[o0:o1] = flat[o0 * nb:o1 * nb].view(nb, o1 - o0).t().contiguous()
    return bits


def _reorder_in_cpp(bits: torch.Tensor, to_blocks: bool) -> bool:
    """The C++ reorder where it applies (1.3B: ~0.9 s of the Python loop per load otherwise)."""
    if bits.device.type != "cpu" or not bits.is_contiguous() or bits.dim() != 2:
        return False
    from .cpu import extension
    ext = extension()
    if ext is None:
        return False
    ext.reorder_row_blocks_(bits, to_blocks)
    return True
