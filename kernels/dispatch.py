"""Kernel entry points: validate once, then pick a backend by device, dtype and shape.

Backends:
- "cpu":    C++ kernels (kernels/cpu.py). x is quantized per token to int8 for the sign
            product (see kernels/linear_ref.py act_quant); corrections, shifts and bias stay fp32.
- "triton": GPU kernels (kernels/triton_linear.py), fp32 accumulation, no activation quantization.
- "ref":    pure torch, dequantize then F.linear (the exact maths of the formats).

DFPLAN_KERNELS=auto|ref|cpu|triton forces one (auto: CUDA tensors -> triton, CPU tensors ->
cpu, anything else or an unavailable backend -> ref). Forcing a backend that cannot run the
given tensors is an error, never a silent fallback. Calls that need gradients use ref.
"""
from __future__ import annotations

import os

import torch

from .errors import KernelError
from .linear_ref import binary_linear_ref, int8_linear_ref
from .packing import ROW_BLOCKS, ROWS, from_row_blocks, packed_cols
from .step_ref import mamba2_step_ref

MODES = ("auto", "ref", "cpu", "triton")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def kernel_mode() -> str:
    mode = os.environ.get("DFPLAN_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise KernelError(f"DFPLAN_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    return mode


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_BACKENDS: dict = {}  # (mode, device type, TRITON_INTERPRET) -> backend; decode calls are hot
_environ = os.environ


def select_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend that will run for activations x (honours DFPLAN_KERNELS / `backend`)."""
    mode = backend or _environ.get("DFPLAN_KERNELS", "auto")
    # TRITON_INTERPRET only changes the answer when Triton is forced (CPU tensors allowed)
    key = (mode, x.device.type, _environ.get("TRITON_INTERPRET") if mode[:1] in "tT" else None)
    be = _BACKENDS.get(key)
    if be is None:
        be = _BACKENDS[key] = _select(x.device, mode.strip().lower() or "auto")
    return be


def _select(dev: torch.device, mode: str) -> str:
    if mode not in MODES:
        raise KernelError(f"kernel backend / DFPLAN_KERNELS={mode!r} is not one of {', '.join(MODES)}")
    if mode == "ref":
        return "ref"
    if mode == "cpu":
        if dev.type != "cpu":
            raise KernelError(f"CPU kernels were requested but the tensors are on {dev}; "
                              "unset DFPLAN_KERNELS or move the model to the CPU")
        from . import cpu
        if not cpu.available():
            raise KernelError(f"CPU kernels were requested but could not be built "
                              f"({cpu.build_error()}); install a C++ compiler or unset DFPLAN_KERNELS")
        return "cpu"
    if mode == "triton":
        if not _triton_usable(dev):
            raise KernelError(f"Triton kernels were requested for tensors on {dev}; they need a "
                              "CUDA device and an importable triton (or TRITON_INTERPRET=1)")
        return "triton"
    # auto
    if dev.type == "cuda":
        return "triton" if _triton_usable(dev) else "ref"
    if dev.type == "cpu":
        from . import cpu
        return "cpu" if cpu.available() else "ref"
    return "ref"


# --- validation ---------------------------------------------------------------------------

def _fail(fn: str, msg: str):
    raise KernelError(f"{fn}: {msg}")


def _check_vec(fn, name, t, n, device):
    if (isinstance(t, torch.Tensor) and t.dtype in _FLOATS and t.dim() == 1 and t.shape[0] == n
            and t.device == device):
        return  # the common case, checked in one go; the branches below only explain failures
    if not isinstance(t, torch.Tensor):
        _fail(fn, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(fn, f"{name} must be float32/float16/bfloat16, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != n:
        _fail(fn, f"{name} must have shape ({n},), got {tuple(t.shape)}")
    if t.device != device:
        _fail(fn, f"{name} is on {t.device} but x is on {device}; move the module and x together")


def _check_mat(fn, name, t, dtype, shape, device):
    if (isinstance(t, torch.Tensor) and t.dtype == dtype and t.dim() == 2
            and (shape[0] is None or t.shape[0] == shape[0])
            and (shape[1] is None or t.shape[1] == shape[1]) and t.is_contiguous()
            and t.device == device):
        return
    if not isinstance(t, torch.Tensor):
        _fail(fn, f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        _fail(fn, f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != 2 or (shape[0] is not None and t.shape[0] != shape[0]) or \
            (shape[1] is not None and t.shape[1] != shape[1]):
        want = ", ".join("?" if s is None else str(s) for s in shape)
        _fail(fn, f"{name} must have shape ({want}), got {tuple(t.shape)}")
    if not t.is_contiguous():
        _fail(fn, f"{name} must be contiguous (call .contiguous() when loading the weights)")
    if t.device != device:
        _fail(fn, f"{name} is on {t.device} but x is on {device}; move the module and x together")


def _check_x(fn, x, in_features):
    if not isinstance(x, torch.Tensor):
        _fail(fn, f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        _fail(fn, f"x must be float32/float16/bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        _fail(fn, f"x must have shape (..., {in_features}), got {tuple(x.shape)}")


def check_binary_args(x, bits, row_scale, in_features, col_scale, col_shift, u, u_scale, v,
                      v_scale, bias) -> None:
    fn = "binary_linear"
    if not isinstance(in_features, int) or in_features <= 0:
        _fail(fn, f"in_features must be a positive int, got {in_features!r}")
    _check_x(fn, x, in_features)
    dev = x.device
    if isinstance(bits, torch.Tensor) and bits.dim() == 2 and bits.shape[1] != packed_cols(in_features):
        _fail(fn, f"bits has {bits.shape[1]} bytes per row but in_features={in_features} packs into "
                  f"{packed_cols(in_features)} (kernels/packing.py layout); wrong in_features or packing")
    _check_mat(fn, "bits", bits, torch.uint8, (None, packed_cols(in_features)), dev)
    out_f = bits.shape[0]
    if (col_scale is None) != (col_shift is None):
        _fail(fn, "col_scale and col_shift (FBI) must be given together")
    if col_scale is not None:
        if row_scale is not None:
            _fail(fn, "pass either row_scale (row scaling) or col_scale/col_shift (FBI), not both")
        _check_vec(fn, "col_scale", col_scale, in_features, dev)
        _check_vec(fn, "col_shift", col_shift, in_features, dev)
    elif row_scale is None:
        _fail(fn, "row_scale is required unless col_scale/col_shift (FBI) are given")
    else:
        _check_vec(fn, "row_scale", row_scale, out_f, dev)
    corr = (u, u_scale, v, v_scale)
    if any(t is not None for t in corr):
        if any(t is None for t in corr):
            _fail(fn, "the low-rank correction needs all of u, u_scale, v, v_scale")
        _check_mat(fn, "u", u, torch.int8, (out_f, None), dev)
        r = u.shape[1]
        _check_mat(fn, "v", v, torch.int8, (r, in_features), dev)
        _check_vec(fn, "u_scale", u_scale, out_f, dev)
        _check_vec(fn, "v_scale", v_scale, r, dev)
    if bias is not None:
        _check_vec(fn, "bias", bias, out_f, dev)


def check_int8_args(x, qweight, scale, bias) -> None:
    fn = "int8_linear"
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        _fail(fn, "qweight must be a 2-D int8 tensor (out, in)")
    out_f, in_f = qweight.shape
    _check_x(fn, x, in_f)
    _check_mat(fn, "qweight", qweight, torch.int8, (out_f, in_f), x.device)
    _check_vec(fn, "scale", scale, out_f, x.device)
    if bias is not None:
        _check_vec(fn, "bias", bias, out_f, x.device)


def _needs_grad(*ts) -> bool:
    if not torch.is_grad_enabled():
        return False
    for t in ts:
        if t is not None and t.requires_grad:
            return True
    return False


_fast: dict = {}  # backend entry points, imported once (an import statement per call costs us)


def _impl(name: str):
    f = _fast.get(name)
    if f is None:
        if name.endswith("_cpu"):
            from . import cpu as mod
        elif name == "mamba2_step_triton":
            from . import triton_step as mod
        else:
            from . import triton_linear as mod
        f = _fast[name] = getattr(mod, name)
    return f


def _contig(t):
    return None if t is None else t.contiguous()


# --- entry points ---------------------------------------------------------------------------

def _as_rows(x, in_features, dtype):
    """x (..., in) -> contiguous (T, in) [in `dtype`]; a no-op for the usual decode input."""
    if x.dim() != 2 or not x.is_contiguous() or (dtype is not None and x.dtype != dtype):
        x = x.reshape(-1, in_features)
        if dtype is not None:
            x = x.to(dtype)
        x = x.contiguous()
    return x


def _like(y, x):
    """(T, out) kernel result -> (..., out) in x's dtype."""
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if x.dim() != 2:
        y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y


def preferred_bits_layout(bits: torch.Tensor) -> int:
    """ROW_BLOCKS where the C++ kernels run these bits with AVX2 or better (its one-token
    lookup kernel reads them, 1.5-2x faster than rows), else ROWS. DFPLAN_ROW_BLOCKS=0 keeps
    ROWS everywhere (A/B timing)."""
    if (bits.device.type != "cpu" or bits.is_meta or _environ.get("DFPLAN_ROW_BLOCKS", "1") == "0"
            or select_backend(bits) != "cpu"):
        return ROWS
    from .cpu import best_isa
    return ROW_BLOCKS if best_isa() >= 1 else ROWS


def binary_linear(x, bits, row_scale, in_features, *, col_scale=None, col_shift=None, u=None,
                  u_scale=None, v=None, v_scale=None, bias=None, backend: str | None = None,
                  layout: int = ROWS):
    """y = row_scale * (S @ x) [FBI: S @ (col_scale * x) + col_shift . x]
           + (u * u_scale) @ ((v * v_scale) @ x) + bias.

    x (..., in) float32/float16/bfloat16 -> y (..., out) in x's dtype. bits (out, ceil(in/8))
    uint8 in kernels/packing.py layout (`layout` ROWS, or ROW_BLOCKS: the same bytes
    reordered by packing.to_row_blocks); u int8 (out, r), v int8 (r, in); scales any float
    dtype. x may be non-contiguous (it is copied); weights must be contiguous.
    """
    check_binary_args(x, bits, row_scale, in_features, col_scale, col_shift, u, u_scale, v,
                      v_scale, bias)
    if layout not in (ROWS, ROW_BLOCKS):
        raise KernelError(f"binary_linear: layout must be {ROWS} (rows) or {ROW_BLOCKS} (row blocks), got {layout}")
    kw = dict(col_scale=col_scale, col_shift=col_shift, u=u, u_scale=u_scale, v=v,
              v_scale=v_scale, bias=bias)
    be = select_backend(x, backend)
    grad = _needs_grad(x, row_scale, col_scale, col_shift, u_scale, v_scale, bias)
    if layout == ROW_BLOCKS and (be != "cpu" or grad):   # only the C++ kernel reads row blocks
        bits, layout = from_row_blocks(bits), ROWS
    if be == "ref" or grad:
        return binary_linear_ref(x, bits, row_scale, in_features, **kw)
    if be == "cpu":
        y = _impl("binary_linear_cpu")(_as_rows(x, in_features, torch.float32), bits, row_scale,
                                       in_features, layout=layout, **kw)
    else:
        y = _impl("binary_linear_triton")(_as_rows(x, in_features, None), bits, row_scale,
                                          in_features, **kw)
    return _like(y, x)


def int8_linear(x, qweight, scale, bias=None, *, backend: str | None = None):
    """y = x @ (qweight * scale[:, None]).T + bias; qweight int8 (out, in), scale (out,)."""
    check_int8_args(x, qweight, scale, bias)
    be = select_backend(x, backend)
    if be == "ref" or _needs_grad(x, scale, bias):
        return int8_linear_ref(x, qweight, scale, bias)
    if be == "cpu":
        y = _impl("int8_linear_cpu")(_as_rows(x, qweight.shape[1], torch.float32), qweight, scale,
                                     bias)
    else:
        y = _impl("int8_linear_triton")(_as_rows(x, qweight.shape[1], None), qweight, scale, bias)
    return _like(y, x)


def int8_embedding(ids, qweight, scale, dtype=torch.float32):
    """ids (...) int64 -> (..., d): rows of qweight * scale[:, None] (gather, then scale)."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise KernelError(f"int8_embedding: ids must be int64/int32, got {ids.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise KernelError("int8_embedding: qweight must be a 2-D int8 tensor (vocab, d)")
    flat = ids.reshape(-1)
    # CPU only: on CUDA the check would synchronise (and break graph capture).
    if flat.device.type == "cpu" and flat.numel() and \
            (int(flat.min()) < 0 or int(flat.max()) >= qweight.shape[0]):
        raise KernelError(f"int8_embedding: token ids must lie in [0, {qweight.shape[0]})")
    rows = qweight.index_select(0, flat).to(dtype)
    return (rows * scale.index_select(0, flat).to(dtype)[:, None]).reshape(*ids.shape, -1)


def mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                norm_weight, eps, ngroups, headdim, d_state, *, norm_before_gate: bool = False,
                backend: str | None = None):
    """One Mamba-2 mixer token between in_proj and out_proj (see ref.mamba2_step_ref).

    States are updated in place, so they must be contiguous. CUDA: Triton kernels (capturable
    in a CUDA graph); CPU with fp32 tensors (the SSM state may be fp32, bf16 or fp16): the
    fused C++ step; otherwise the reference.
    """
    fn = "mamba2_step"
    for name, t in (("conv_state", conv_state), ("ssm_state", ssm_state)):
        if not isinstance(t, torch.Tensor) or not t.is_contiguous():
            _fail(fn, f"{name} must be a contiguous tensor (it is updated in place)")
        if t.device != zxbcdt.device:
            _fail(fn, f"{name} is on {t.device} but zxbcdt is on {zxbcdt.device}")
    if zxbcdt.dtype not in _FLOATS or zxbcdt.dim() != 2:
        _fail(fn, f"zxbcdt must be a 2-D float tensor (B, d_in_proj), got {zxbcdt.dtype} "
                  f"{tuple(zxbcdt.shape)}")
    H = dt_bias.shape[0]
    d_inner = H * headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    Bsz = zxbcdt.shape[0]
    want = {"zxbcdt": (zxbcdt, (Bsz, d_inner + conv_dim + H)),
            "conv_state": (conv_state, (Bsz, conv_dim, conv_state.shape[-1])),
            "ssm_state": (ssm_state, (Bsz, H, headdim, d_state)),
            "norm_weight": (norm_weight, (d_inner,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            _fail(fn, f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if H % ngroups:
        _fail(fn, f"nheads={H} is not a multiple of ngroups={ngroups}")
    if D.numel() not in (H, d_inner):
        _fail(fn, f"D must have {H} or {d_inner} elements, got {D.numel()}")
    args = (zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
            norm_weight, eps, ngroups, headdim, d_state)
    be = select_backend(zxbcdt, backend)
    # the SSM state may be kept in bf16 / fp16 (half the state traffic); the rest is fp32
    if be == "cpu" and ssm_state.dtype in _FLOATS and all(t is None or t.dtype == torch.float32 for t in (
            zxbcdt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight)):
        # .contiguous() returns self (no copy) for the usual contiguous params
        return _impl("mamba2_step_cpu")(
            zxbcdt.contiguous(), conv_state, ssm_state, _contig(conv_weight), _contig(conv_bias),
            _contig(dt_bias), _contig(A_log), _contig(D), _contig(norm_weight), eps, ngroups,
            headdim, d_state, norm_before_gate=norm_before_gate)
    if be == "triton":
        if zxbcdt.stride(-1) != 1:
            zxbcdt = zxbcdt.contiguous()
        return _impl("mamba2_step_triton")(zxbcdt, *args[1:], norm_before_gate=norm_before_gate)
    return mamba2_step_ref(*args, norm_before_gate=norm_before_gate)
