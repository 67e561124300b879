"""Triton kernels for the packed 1-bit and int8 linears (GPU; TRITON_INTERPRET=1 on CPU for tests).

- GEMV path (few tokens, decode): one program per (block of output rows, token). Each
  program streams its rows' packed bytes once as a 2-D tile, expands the 8 bits of every byte
  in registers and accumulates +-x in fp32, so HBM traffic is the packed bits themselves.
- GEMM path (prefill, large batch): bits expand to a +-1 tile in the activation dtype (exact in
  fp16 / bf16) and go through tl.dot with fp32 accumulation.
- Both fuse the epilogue: row scale, FBI column scale / shift, the low-rank correction's
  U part (t = (v * v_scale) @ x comes from a small kernel first), bias, output dtype.

No host synchronisation and no data-dependent shapes: every call can be captured in a CUDA
graph. Activations are not quantized here (the GPU has compute to spare), so results follow
the exact reference up to fp32 summation order.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Decided when the kernels are decorated (tests reload this module under TRITON_INTERPRET=1).
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
GEMV_MAX_TOKENS = 8       # up to this many tokens the weight-streaming GEMV path wins


@triton.jit
def _lowrank_t_kernel(x_ptr, v_ptr, vs_ptr, t_ptr, K, R, stride_xm,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    # t[m, j] = v_scale[j] * sum_k v[j, k] * x[m, k]      t (M, R) fp32
    m = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    jm = j < R
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        xv = tl.load(x_ptr + m * stride_xm + k, mask=km, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + j[:, None] * K + k[None, :], mask=jm[:, None] & km[None, :],
                     other=0).to(tl.float32)
        acc += tl.sum(vv * xv[None, :], axis=1)
    acc = acc * tl.load(vs_ptr + j, mask=jm, other=0.0).to(tl.float32)
    tl.store(t_ptr + m * R + j, acc, mask=jm)


@triton.jit
def _epilogue(acc, rows, rmask, m, rs_ptr, u_ptr, us_ptr, t_ptr, bias_ptr, R,
              HAS_RS: tl.constexpr, HAS_CORR: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_R: tl.constexpr):
    # acc (BLOCK_N,) fp32 for token m -> scaled, corrected, biased
    if HAS_RS:
        acc = acc * tl.load(rs_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_CORR:
        j = tl.arange(0, BLOCK_R)
        jm = j < R
        uu = tl.load(u_ptr + rows[:, None] * R + j[None, :], mask=rmask[:, None] & jm[None, :],
                     other=0).to(tl.float32)                                  # (BN, BR)
        tt = tl.load(t_ptr + m * R + j, mask=jm, other=0.0)                    # (BR,)
        us = tl.load(us_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        acc += tl.sum(uu * tt[None, :], axis=1) * us
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _bin_gemv_kernel(x_ptr, bits_ptr, rs_ptr, cs_ptr, csh_ptr, u_ptr, us_ptr, t_ptr, bias_ptr,
                     y_ptr, N, K, NB, R, stride_xm, stride_ym,
                     HAS_RS: tl.constexpr, FBI: tl.constexpr, HAS_CORR: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
                     BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    shifts = tl.arange(0, 8)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    shift_acc = tl.zeros((1,), tl.float32)
    for kb0 in range(0, NB, BLOCK_KB):
        kb = kb0 + tl.arange(0, BLOCK_KB)
        w = tl.load(bits_ptr + rows[:, None] * NB + kb[None, :],
                    mask=rmask[:, None] & (kb < NB)[None, :], other=0)          # (BN, BKB) u8
        cols = kb[:, None] * 8 + shifts[None, :]                                 # (BKB, 8)
        cm = cols < K                       # padding bits meet zero activations
        xv = tl.load(x_ptr + m * stride_xm + cols, mask=cm, other=0.0).to(tl.float32)
        if FBI:
            sh = tl.load(csh_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            shift_acc += tl.sum(tl.sum(xv * sh, axis=1), axis=0)
            xv = xv * tl.load(cs_ptr + cols, mask=cm, other=0.0).to(tl.float32)
        b = (w[:, :, None].to(tl.int32) >> shifts[None, None, :]) & 1           # (BN, BKB, 8)
        pm = tl.where(b != 0, xv[None, :, :], -xv[None, :, :])
        acc += tl.sum(tl.sum(pm, axis=2), axis=1)
    if FBI:
        acc += shift_acc
    acc = _epilogue(acc, rows, rmask, m, rs_ptr, u_ptr, us_ptr, t_ptr, bias_ptr, R,
                    HAS_RS, HAS_CORR, HAS_BIAS, BLOCK_R)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _bin_gemm_kernel(x_ptr, bits_ptr, rs_ptr, cs_ptr, csh_ptr, u_ptr, us_ptr, t_ptr, bias_ptr,
                     y_ptr, M, N, K, NB, R, stride_xm, stride_ym,
                     HAS_RS: tl.constexpr, FBI: tl.constexpr, HAS_CORR: tl.constexpr,
                     HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    nm = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    shift = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        km = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=mm[:, None] & km[None, :], other=0.0)                 # (BM, BK)
        if FBI:
            xf = xt.to(tl.float32)
            sh = tl.load(csh_ptr + offs_k, mask=km, other=0.0).to(tl.float32)
            shift += tl.sum(xf * sh[None, :], axis=1)
            cs = tl.load(cs_ptr + offs_k, mask=km, other=0.0).to(tl.float32)
            xt = (xf * cs[None, :]).to(xt.dtype)
        wb = tl.load(bits_ptr + offs_n[None, :] * NB + offs_k[:, None] // 8,
                     mask=nm[None, :] & km[:, None], other=0).to(tl.int32)     # (BK, BN)
        sgn = (((wb >> (offs_k[:, None] % 8)) & 1) * 2 - 1).to(xt.dtype)        # +-1, exact
        if IEEE:
            acc = tl.dot(xt, sgn, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, sgn, acc)
    if HAS_RS:
        acc = acc * tl.load(rs_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    if FBI:
        acc += shift[:, None]
    if HAS_CORR:
        # (BM, BR) @ (BR, BN) on CUDA cores: R is small and the tile already sits in registers
        corr_acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for j in range(0, R):
            tj = tl.load(t_ptr + offs_m * R + j, mask=mm, other=0.0)
            uj = tl.load(u_ptr + offs_n * R + j, mask=nm, other=0).to(tl.float32)
            corr_acc += tj[:, None] * uj[None, :]
        acc += corr_acc * tl.load(us_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


@triton.jit
def _i8_gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, N, K, stride_xm, stride_ym,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        w = tl.load(w_ptr + rows[:, None] * K + k[None, :], mask=rmask[:, None] & km[None, :],
                    other=0).to(tl.float32)
        xv = tl.load(x_ptr + m * stride_xm + k, mask=km, other=0.0).to(tl.float32)
        acc += tl.sum(w * xv[None, :], axis=1)
    acc = acc * tl.load(s_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def _i8_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = offs_m < M
    nm = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        km = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                     mask=mm[:, None] & km[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                     mask=nm[None, :] & km[:, None], other=0).to(xt.dtype)       # int8 exact
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    acc = acc * tl.load(s_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nm, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


# --- launchers --------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(1, n)))


def binary_linear_triton(x2, bits, row_scale, in_features, col_scale=None, col_shift=None,
                         u=None, u_scale=None, v=None, v_scale=None, bias=None, out=None,
                         force: str | None = None):
    """x2 (M, K) contiguous -> y (M, N) in x2's dtype. Arguments already validated.

    force: "gemv" / "gemm" to pick a path regardless of M (tests); out: tensor to write into.
    """
    M, K = x2.shape
    N, NB = bits.shape
    y = out if out is not None else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0 or N == 0:
        return y
    fbi = col_scale is not None
    corr = u is not None
    R = u.shape[1] if corr else 0
    t = x2  # placeholder pointer for absent tensors (never read: constexpr flags)
    if corr:
        t = torch.empty((M, R), device=x2.device, dtype=torch.float32)
        _lowrank_t_kernel[(M, triton.cdiv(R, 16))](x2, v, v_scale, t, K, R, x2.stride(0),
                                                   BLOCK_R=16, BLOCK_K=128)
    ph = x2
    args = (x2, bits, row_scale if row_scale is not None else ph, col_scale if fbi else ph,
            col_shift if fbi else ph, u if corr else ph, u_scale if corr else ph, t,
            bias if bias is not None else ph, y)
    flags = dict(HAS_RS=row_scale is not None, FBI=fbi, HAS_CORR=corr, HAS_BIAS=bias is not None)
    path = force or ("gemv" if M <= GEMV_MAX_TOKENS else "gemm")
    if path == "gemv":
        BLOCK_N = 16
        _bin_gemv_kernel[(triton.cdiv(N, BLOCK_N), M)](
            *args, N, K, NB, R, x2.stride(0), y.stride(0), **flags,
            BLOCK_N=BLOCK_N, BLOCK_KB=64, BLOCK_R=_pow2(R, 2), num_warps=4)
    else:
        BM, BN, BK = (16 if M <= 16 else 64), 64, 64
        _bin_gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            *args, M, N, K, NB, R, x2.stride(0), y.stride(0), **flags,
            IEEE=x2.dtype == torch.float32, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            BLOCK_R=_pow2(R, 2), num_warps=4)
    return y


def int8_linear_triton(x2, qweight, scale, bias=None, out=None, force: str | None = None):
    """x2 (M, K) contiguous -> y (M, N) in x2's dtype. Arguments already validated."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = out if out is not None else torch.empty((M, N), device=x2.device, dtype=x2.dtype)
    if M == 0 or N == 0:
        return y
    b = bias if bias is not None else x2
    path = force or ("gemv" if M <= GEMV_MAX_TOKENS else "gemm")
    if path == "gemv":
        BLOCK_N = 16
        _i8_gemv_kernel[(triton.cdiv(N, BLOCK_N), M)](
            x2, qweight, scale, b, y, N, K, x2.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=BLOCK_N, BLOCK_K=256, num_warps=4)
    else:
        BM, BN, BK = (16 if M <= 16 else 64), 64, 64
        _i8_gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
            x2, qweight, scale, b, y, M, N, K, x2.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, IEEE=x2.dtype == torch.float32,
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=4)
    return y
