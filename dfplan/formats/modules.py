"""Inference modules for the compressed formats: buffers only, swapped in for nn.Linear / Embedding.

Each module holds exactly the tensors of its spec's payload (specs.py documents the layouts),
under the same names, so `module.state_dict()` is what the packed checkpoint stores; an
optional `bias` buffer is kept in the compute dtype and stored under the plan's default dtype.

forward: dfplan.kernels dispatch (binary_linear / int8_linear), which picks the C++ / Triton kernel
or its reference twin; forward_reference: dequantize(), then F.linear. Modules are built from a
float weight (`from_float`) or empty on the meta device (`empty`) and then assign-loaded.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels as K
from ..errors import DfplanError
from ..kernels import fbgemm
from ..kernels.packing import ROW_BLOCKS, ROWS, from_row_blocks, from_row_blocks_, to_row_blocks_
from . import quant
from .specs import Binary, IntN, Spec


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


class CompressedModule(nn.Module):
    """Common part: spec, shape, payload buffers (+ optional bias)."""

    def __init__(self, spec: Spec, shape: tuple[int, int], bias: bool = False, device=None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.spec = spec
        self._check_spec_kind()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.compute_dtype = compute_dtype
        for t in spec.payload(shape):
            self.register_buffer(t.name, torch.empty(t.shape, dtype=_torch_dtype(t.dtype), device=device))
        self.register_buffer("bias", torch.empty(self.out_features, dtype=compute_dtype, device=device)
                             if bias else None)

    @classmethod
    def empty(cls, spec: Spec, shape, bias: bool = False, device="meta",
              compute_dtype: torch.dtype = torch.float32):
        return cls(spec, tuple(shape), bias=bias, device=device, compute_dtype=compute_dtype)

    @classmethod
    def from_float(cls, weight: torch.Tensor, spec: Spec, bias: torch.Tensor | None = None,
                   generator: torch.Generator | None = None):
        """Quantise a float (out, in) weight into a new module on the weight's device."""
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        m = cls(spec, tuple(weight.shape), bias=bias is not None, device="meta", compute_dtype=dtype)
        bufs = quant.encode_weight(weight.detach().float().cpu(), spec, generator)
        for name, t in bufs.items():
            setattr(m, name, t.to(weight.device))
        if bias is not None:
            m.bias = bias.detach().to(dtype).clone()
        return m

    def payload(self) -> dict[str, torch.Tensor]:
        return {t.name: getattr(self, t.name) for t in self.spec.payload((self.out_features, self.in_features))}

    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight this module computes with, in its compute dtype."""
        return quant.decode_weight(self.spec, (self.out_features, self.in_features), self.payload(),
                                   dtype=self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.spec}, bias={self.bias is not None}"

    def _check_spec_kind(self):
        """Raise DfplanError when self.spec is not a format this class implements."""


class BinaryLinear(CompressedModule):
    """1-bit sign scaffold (row or FBI scales) + optional quantised low-rank correction."""

    def _check_spec_kind(self):
        if not isinstance(self.spec, Binary):
            raise DfplanError(f"BinaryLinear needs a bin/fbi spec, got {self.spec}")

    def __init__(self, spec: Binary, shape, bias: bool = False, device=None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(spec, shape, bias, device, compute_dtype)
        self._uv8 = None        # unpacked int8 U, V when rank_bits < 8 (kernels take int8)
        # order of the bytes in self.bits: ROWS, or ROW_BLOCKS after fast_weights() on CPU.
        # Only forward sees the second order; payload(), state_dict() and device moves
        # always get row-major bits.
        self.bits_layout = ROWS

    def fast_weights(self):
        """On CPU with the C++ kernels: reorder the sign bits in place (same bytes, no copy
        kept) into the row blocks that the one-token lookup kernel reads, 1.5-2x faster at
        batch 1 (csrc/linear_cpu.cpp). Elsewhere, or with DFPLAN_ROW_BLOCKS=0 (for A/B
        timing), a no-op (kernels.preferred_bits_layout). Model.prepare calls this."""
        b = self.bits
        if self.bits_layout == ROWS and K.preferred_bits_layout(b) == ROW_BLOCKS:
            with torch.no_grad():
                to_row_blocks_(b)
            self.bits_layout = ROW_BLOCKS
        return self.bits_layout

    def _row_major_bits(self) -> torch.Tensor:
        return from_row_blocks(self.bits) if self.bits_layout == ROW_BLOCKS else self.bits

    def payload(self) -> dict[str, torch.Tensor]:
        p = super().payload()
        p["bits"] = self._row_major_bits()
        return p

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.bits_layout == ROW_BLOCKS:
            destination[prefix + "bits"] = self._row_major_bits()

    def _load_from_state_dict(self, *args, **kw):
        super()._load_from_state_dict(*args, **kw)
        self.bits_layout = ROWS        # whatever was loaded (copied or assigned) is row-major

    def _correction_int8(self):
        s = self.spec
        if not s.rank:
            return None, None
        if s.rank_bits == 8:
            return self.u, self.v
        if self._uv8 is None or self._uv8[0].device != self.u.device:
            self._uv8 = (quant.unpack_intn(self.u, s.rank, s.rank_bits, True).to(torch.int8),
                         quant.unpack_intn(self.v, self.in_features, s.rank_bits, True).to(torch.int8))
        return self._uv8

    def _apply(self, fn, *args, **kw):
        self._uv8 = None        # device / dtype moves invalidate the unpacked cache
        blocks = self.bits_layout == ROW_BLOCKS
        if blocks:              # every other device and kernel reads row-major bits
            with torch.no_grad():
                from_row_blocks_(self.bits)
            self.bits_layout = ROWS
        out = super()._apply(fn, *args, **kw)
        if blocks:              # still on CPU (a dtype cast, ...): keep the fast order
            self.fast_weights()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:              # (..., in) -> (..., out)
        fbi = self.spec.scale == "fbi"
        u, v = self._correction_int8()
        r = self.spec.rank > 0
        return K.binary_linear(
            x, self.bits, None if fbi else self.row_scale, self.in_features,
            col_scale=self.col_scale if fbi else None, col_shift=self.col_shift if fbi else None,
            u=u, u_scale=self.u_scale if r else None, v=v, v_scale=self.v_scale if r else None,
            bias=self.bias, layout=self.bits_layout)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), b)


class IntNLinear(CompressedModule):
    """Weight-only IntN linear (per row or per group, symmetric or asymmetric)."""

    def _check_spec_kind(self):
        if not isinstance(self.spec, IntN):
            raise DfplanError(f"IntNLinear needs an intN spec, got {self.spec}")

    def __init__(self, spec: IntN, shape, bias: bool = False, device=None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(spec, shape, bias, device, compute_dtype)
        self._fast = None       # (key, kind, tensors): the one-time unpack of 2/3/4-bit codes

    @property
    def is_int8_rowwise(self) -> bool:
        s = self.spec
        return s.bits == 8 and s.group == 0 and s.symmetric

    def _apply(self, fn, *args, **kw):
        self._fast = None       # device / dtype moves invalidate the unpacked cache
        return super()._apply(fn, *args, **kw)

    def fast_weights(self):
        """2/3/4-bit codes unpacked once (cached until qweight changes) so that no call
        dequantizes the matrix: row-wise symmetric -> int8 codes for the int8 kernels (on CPU
        prepacked for fbgemm instead when DFPLAN_FBGEMM=1); grouped or asymmetric -> the
        dequantized weight in the compute dtype (4 bytes/weight in fp32)."""
        key = _version_key(self.qweight)
        if self._fast is not None and self._fast[0] == key:
            return self._fast[1], self._fast[2]
        s = self.spec
        if s.group == 0 and s.symmetric:
            q8 = quant.unpack_intn(self.qweight, self.in_features, s.bits, True).to(torch.int8).contiguous()
            if self.qweight.device.type == "cpu" and fbgemm.available():
                kind, ts = "fbgemm", (fbgemm.prepack(q8, self.scale.float(), self.bias), q8)
            else:
                kind, ts = "int8", (q8,)
        else:
            kind, ts = "dense", (self.dequantize(),)
        self._fast = (key, kind, ts)
        return kind, ts

    def forward(self, x: torch.Tensor) -> torch.Tensor:              # (..., in) -> (..., out)
        if self.is_int8_rowwise:
            return K.int8_linear(x, self.qweight, self.scale, self.bias)
        if _grad_needed(x, self.bias):
            return self.forward_reference(x)
        kind, ts = self.fast_weights()
        if kind == "fbgemm" and x.numel() // self.in_features <= fbgemm.MAX_ROWS:
            return _fbgemm_linear(x, ts[0], self.in_features)
        if kind == "dense":
            b = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, ts[0].to(x.dtype), b)
        return K.int8_linear(x, ts[-1], self.scale, self.bias)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), b)


class IntNEmbedding(CompressedModule):
    """Row-wise IntN token embedding; attend(h) makes it the tied output head too."""

    def _check_spec_kind(self):
        if not isinstance(self.spec, IntN) or self.spec.group:
            raise DfplanError(f"IntNEmbedding needs a row-wise intN spec, got {self.spec}")

    def __init__(self, spec: IntN, shape, bias: bool = False, device=None,
                 compute_dtype: torch.dtype = torch.float32):
        if bias:
            raise DfplanError("an embedding has no bias")
        super().__init__(spec, shape, False, device, compute_dtype)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:            # (B, L) -> (B, L, d)
        # dequantise only the gathered rows: the table itself stays packed
        s = self.spec
        if s.bits == 8 and s.symmetric:
            return K.int8_embedding(ids, self.qweight, self.scale, dtype=self.compute_dtype)
        return self.forward_reference(ids)

    def forward_reference(self, ids: torch.Tensor) -> torch.Tensor:
        s = self.spec
        flat = ids.reshape(-1)
        q = quant.unpack_intn(self.qweight[flat], self.in_features, s.bits, s.symmetric)
        zero = None if s.symmetric else self.zero[flat]
        rows = quant.dequantize_intn(q, self.scale[flat], zero, dtype=self.compute_dtype)
        return rows.reshape(*ids.shape, self.in_features)

    def _apply(self, fn, *args, **kw):
        self._fast = None
        return super()._apply(fn, *args, **kw)

    def head_weights(self):
        """The output head's fast weights, built once: int8 codes for our kernels (unpacked
        once below 8 bits), or with DFPLAN_FBGEMM=1 on CPU fbgemm's prepacked table (as fast
        on the 1.3B head about as fast as ours, for a second copy of the table)."""
        key = _version_key(self.qweight)
        fast = getattr(self, "_fast", None)
        if fast is not None and fast[0] == key:
            return fast[1], fast[2]
        s = self.spec
        q8 = self.qweight if s.bits == 8 else \
            quant.unpack_intn(self.qweight, self.in_features, s.bits, True).to(torch.int8).contiguous()
        if self.qweight.device.type == "cpu" and fbgemm.available():
            kind, ts = "fbgemm", (fbgemm.prepack(q8, self.scale.float()), q8)
        else:
            kind, ts = "int8", (q8,)
        self._fast = (key, kind, ts)
        return kind, ts

    def attend(self, h: torch.Tensor) -> torch.Tensor:               # (..., d) -> (..., V)
        if not self.spec.symmetric or _grad_needed(h):
            return self.attend_reference(h)
        kind, ts = self.head_weights()
        if kind == "fbgemm" and h.numel() // self.in_features <= fbgemm.MAX_ROWS:
            return _fbgemm_linear(h, ts[0], self.in_features)
        return K.int8_linear(h, ts[-1], self.scale)

    def attend_reference(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.dequantize().to(h.dtype))


def _version_key(t: torch.Tensor) -> tuple:
    """Changes whenever t is replaced or modified in place (a cache built from t is stale)."""
    return t.data_ptr(), t._version, t.device


def _grad_needed(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def _fbgemm_linear(x: torch.Tensor, packed, in_features: int) -> torch.Tensor:
    """(..., in) -> (..., out) in x's dtype through fbgemm (token rows passed one by one)."""
    x2 = x.reshape(-1, in_features).float().contiguous()
    y = fbgemm.linear(x2, packed)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def module_for(spec: Spec, kind: str):
    """Which module class implements `spec` for a unit of `kind` (None: stays a float module)."""
    if isinstance(spec, Binary):
        if kind in ("embedding", "lm_head"):
            raise DfplanError(f"{kind} cannot take {spec}; use a Keep or row-wise IntN format")
        return BinaryLinear
    if isinstance(spec, IntN):
        return IntNEmbedding if kind == "embedding" else IntNLinear
    return None
