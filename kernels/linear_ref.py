"""Pure-torch reference twins of the linear kernels (triton_linear.py, csrc/linear_cpu.cpp,
csrc/int8_cpu.cpp): slow, obviously correct, any device.

Two flavours of the linear references:
- exact (act_quant=False): dequantize the weight, then F.linear — the maths the formats define;
- act_quant=True: the arithmetic the CPU kernels perform, with x quantized per token to int8
  (scale amax / 127, round half to even), so a kernel can be compared with tight tolerances.
  The difference between the two flavours is bounded separately in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import unpack_signs

# --- activation quantization ------------------------------------------------------------

def quantize_activations_ref(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (T, in) float32 -> (xq (T, in) float32 integers in [-127, 127], scale (T,)).

    Same operations, in the same order, as quantize_token in csrc/linear_cpu.cpp.
    """
    x2 = x2.float()
    amax = x2.abs().amax(dim=1) if x2.shape[1] else x2.new_zeros(x2.shape[0])  # (T,)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(x2 * inv[:, None]).clamp_(-127, 127)
    return xq, amax / 127.0


# --- 1-bit scaffold -----------------------------------------------------------------------

def binary_dequantize_ref(bits, row_scale, in_features, *, col_scale=None, col_shift=None,
                          u=None, u_scale=None, v=None, v_scale=None) -> torch.Tensor:
    """The full float weight W_hat (out, in) float32 a binary spec stands for."""
    S = unpack_signs(bits, in_features, torch.float32)  # (out, in)
    if col_scale is not None:
        W = S * col_scale.float()[None, :] + col_shift.float()[None, :]
    else:
        W = S * row_scale.float()[:, None]
    if u is not None:
        W = W + (u.float() * u_scale.float()[:, None]) @ (v.float() * v_scale.float()[:, None])
    return W


def binary_linear_ref(x, bits, row_scale, in_features, *, col_scale=None, col_shift=None,
                      u=None, u_scale=None, v=None, v_scale=None, bias=None,
                      act_quant: bool = False) -> torch.Tensor:
    """x (..., in) -> y (..., out) in x's dtype; see kernels.dispatch.binary_linear."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features).float()  # (T, in)
    if not act_quant:
        W = binary_dequantize_ref(bits, row_scale, in_features, col_scale=col_scale,
                                  col_shift=col_shift, u=u, u_scale=u_scale, v=v, v_scale=v_scale)
        y = x2 @ W.T
    else:
        S = unpack_signs(bits, in_features, torch.float32)  # (out, in)
        xs = x2 * col_scale.float() if col_scale is not None else x2
        xq, sx = quantize_activations_ref(xs)
        acc = xq @ S.T  # integers below 2**24: exact in fp32
        scale = sx[:, None] * row_scale.float()[None, :] if row_scale is not None else sx[:, None]
        y = acc * scale
        if col_shift is not None:
            y = y + (x2 @ col_shift.float())[:, None]
        if u is not None:
            t = (x2 @ v.float().T) * v_scale.float()  # (T, r)
            y = y + (t @ u.float().T) * u_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


# --- integer weights ------------------------------------------------------------------------

def int8_linear_ref(x, qweight, scale, bias=None, *, act_quant: bool = False) -> torch.Tensor:
    """y = x @ (qweight * scale[:, None]).T + bias; qweight int8 (out, in), scale (out,)."""
    lead = x.shape[:-1]
    in_f = qweight.shape[1]
    x2 = x.reshape(-1, in_f).float()
    if not act_quant:
        y = x2 @ (qweight.float() * scale.float()[:, None]).T
    else:
        xq, sx = quantize_activations_ref(x2)
        acc = (xq.double() @ qweight.double().T).float()  # int32-exact, then rounded like C++
        y = acc * (sx[:, None] * scale.float()[None, :])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)


def intn_dequantize_ref(q, scale, *, group: int = 0, zero=None) -> torch.Tensor:
    """Integer codes q (out, in) -> float32 (out, in).

    Symmetric: w = q * scale. Asymmetric: w = (q - zero) * scale. scale/zero are (out,)
    for group 0 (one per row) or (out, in // group) for groups along the input dim.
    """
    qf = q.float()
    out_f, in_f = q.shape
    if group:
        qf = qf.reshape(out_f, in_f // group, group)
        s = scale.float()[..., None]
        z = zero.float()[..., None] if zero is not None else None
    else:
        s = scale.float()[:, None]
        z = zero.float()[:, None] if zero is not None else None
    w = (qf - z) * s if z is not None else qf * s
    return w.reshape(out_f, in_f)


def intn_linear_ref(x, q, scale, *, group: int = 0, zero=None, bias=None) -> torch.Tensor:
    """x (..., in) -> (..., out) with the dequantized IntN weight, in x's dtype."""
    W = intn_dequantize_ref(q, scale, group=group, zero=zero)
    y = F.linear(x.float(), W, None if bias is None else bias.float())
    return y.to(x.dtype)


def intn_embedding_ref(ids, q, scale, *, group: int = 0, zero=None,
                       dtype=torch.float32) -> torch.Tensor:
    """ids (...) int64 -> (..., d) rows of the dequantized IntN table (vocab, d)."""
    rows = q[ids.reshape(-1)]  # (n, d): dequantize only the rows asked for
    s = scale[ids.reshape(-1)]
    z = zero[ids.reshape(-1)] if zero is not None else None
    e = intn_dequantize_ref(rows, s, group=group, zero=z)
    return e.to(dtype).reshape(*ids.shape, q.shape[1])
