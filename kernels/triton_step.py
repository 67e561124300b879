"""Triton Mamba-2 decode step (one token, after in_proj, before out_proj).

Three launches, no host synchronisation, fixed shapes: capturable in a CUDA graph.
  1. conv: shift every channel's window, append the new xBC, depthwise taps + bias, SiLU;
  2. ssm:  per (token, head, block of headdim rows) h = exp(dt A) h + dt x B^T, y = h C + D x,
           times silu(z) (norm_before_gate=False);
  3. norm: RMSNorm per SSM group, times the norm weight.
Same maths as kernels.step_ref.mamba2_step_ref, fp32 inside.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _silu(x):
    return x / (1.0 + tl.exp(-x))


@triton.jit
def _conv_kernel(zx_ptr, conv_ptr, w_ptr, cb_ptr, out_ptr, conv_dim, d_conv, xbc_off, stride_zx,
                 HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_W)
    cm = c < conv_dim
    base = conv_ptr + b * conv_dim * d_conv + c[:, None] * d_conv
    # window shifted left by one: position k takes k + 1, the last takes the new input
    nxt = tl.load(base + k[None, :] + 1, mask=cm[:, None] & (k[None, :] + 1 < d_conv), other=0.0)
    new = tl.load(zx_ptr + b * stride_zx + xbc_off + c, mask=cm, other=0.0)
    win = tl.where(k[None, :] == d_conv - 1, new[:, None].to(nxt.dtype), nxt)
    tl.store(base + k[None, :], win, mask=cm[:, None] & (k[None, :] < d_conv))
    w = tl.load(w_ptr + c[:, None] * d_conv + k[None, :], mask=cm[:, None] & (k[None, :] < d_conv),
                other=0.0).to(tl.float32)
    acc = tl.sum(win.to(tl.float32) * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(cb_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * conv_dim + c, _silu(acc), mask=cm)


@triton.jit
def _ssm_kernel(zx_ptr, xbc_ptr, ssm_ptr, dtb_ptr, alog_ptr, d_ptr, y_ptr, H, P, N, G,
                d_inner, conv_dim, stride_zx, D_PER_CHANNEL: tl.constexpr,
                GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm = p < P
    nm = n < N
    g = h // (H // G)
    xrow = xbc_ptr + b * conv_dim
    x = tl.load(xrow + h * P + p, mask=pm, other=0.0)                           # (BP,)
    Bv = tl.load(xrow + d_inner + g * N + n, mask=nm, other=0.0)                # (BN,)
    Cv = tl.load(xrow + d_inner + G * N + g * N + n, mask=nm, other=0.0)
    dt = tl.load(zx_ptr + b * stride_zx + d_inner + conv_dim + h).to(tl.float32) + \
        tl.load(dtb_ptr + h).to(tl.float32)
    dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))                       # softplus
    dA = tl.exp(-dt * tl.exp(tl.load(alog_ptr + h).to(tl.float32)))
    sp = ssm_ptr + ((b * H + h) * P + p[:, None]) * N + n[None, :]
    st = tl.load(sp, mask=pm[:, None] & nm[None, :], other=0.0).to(tl.float32)
    st = st * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(sp, st.to(ssm_ptr.dtype.element_ty), mask=pm[:, None] & nm[None, :])
    y = tl.sum(st * Cv[None, :], axis=1)
    if D_PER_CHANNEL:
        y += x * tl.load(d_ptr + h * P + p, mask=pm, other=0.0).to(tl.float32)
    else:
        y += x * tl.load(d_ptr + h).to(tl.float32)
    if GATE:
        z = tl.load(zx_ptr + b * stride_zx + h * P + p, mask=pm, other=0.0).to(tl.float32)
        y = y * _silu(z)
    tl.store(y_ptr + b * d_inner + h * P + p, y, mask=pm)


@triton.jit
def _norm_kernel(y_ptr, zx_ptr, w_ptr, out_ptr, d_inner, gs, eps, stride_zx,
                 GATE_AFTER: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    i = g * gs + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < gs
    v = tl.load(y_ptr + b * d_inner + i, mask=m, other=0.0)
    r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / gs + eps)
    o = v * r * tl.load(w_ptr + i, mask=m, other=0.0).to(tl.float32)
    if GATE_AFTER:
        o = o * _silu(tl.load(zx_ptr + b * stride_zx + i, mask=m, other=0.0).to(tl.float32))
    tl.store(out_ptr + b * d_inner + i, o.to(out_ptr.dtype.element_ty), mask=m)


def mamba2_step_triton(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                       norm_weight, eps, ngroups, headdim, d_state, *,
                       norm_before_gate: bool = False) -> torch.Tensor:
    """Same arguments and result as kernels.step_ref.mamba2_step_ref; states updated in place.

    zxbcdt (B, d_in_proj) with unit last stride; conv_state, ssm_state, weights contiguous.
    """
    Bsz = zxbcdt.shape[0]
    H, P, N, G = dt_bias.shape[0], headdim, d_state, ngroups
    d_inner = H * P
    conv_dim, d_conv = conv_state.shape[1], conv_state.shape[2]
    dev = zxbcdt.device
    w = conv_weight.reshape(conv_dim, d_conv)
    xbc = torch.empty((Bsz, conv_dim), device=dev, dtype=torch.float32)
    y = torch.empty((Bsz, d_inner), device=dev, dtype=torch.float32)
    out = torch.empty((Bsz, d_inner), device=dev, dtype=zxbcdt.dtype)
    BLOCK_C = 128
    _conv_kernel[(Bsz, triton.cdiv(conv_dim, BLOCK_C))](
        zxbcdt, conv_state, w, conv_bias if conv_bias is not None else w, xbc, conv_dim, d_conv,
        d_inner, zxbcdt.stride(0), HAS_BIAS=conv_bias is not None, BLOCK_C=BLOCK_C,
        BLOCK_W=triton.next_power_of_2(d_conv))
    BLOCK_P = min(16, triton.next_power_of_2(P))
    _ssm_kernel[(Bsz, H, triton.cdiv(P, BLOCK_P))](
        zxbcdt, xbc, ssm_state, dt_bias, A_log, D, y, H, P, N, G, d_inner, conv_dim,
        zxbcdt.stride(0), D_PER_CHANNEL=D.numel() == d_inner, GATE=not norm_before_gate,
        BLOCK_P=BLOCK_P, BLOCK_N=triton.next_power_of_2(N))
    gs = d_inner // G
    _norm_kernel[(Bsz, G)](y, zxbcdt, norm_weight, out, d_inner, gs, eps, zxbcdt.stride(0),
                           GATE_AFTER=norm_before_gate, BLOCK=triton.next_power_of_2(gs))
    return out
