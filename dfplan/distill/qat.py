"""Training-time twins of the packed formats (quantization-aware training modules).

Every module here exposes `weight_eff()`, the (out, in) weight its forward uses, and moves
through the DF-SSM phases the trainer sets (`module.phase`):

  "anneal"   stage 1: latent FP weight w, forward w_eff = (1 - a) w + a Q(w), a rising
             0 -> 1 (`module.anneal`), gradient straight through to w.
             Q = the spec's quantizer: row-scaled sign, FBI, or IntN.
  "correct"  stage 2: Binary units freeze their sign scaffold (from Q of the latent at the
             end of stage 1) and train the fp16-rounded scales and the low-rank factors U, V
             in float; IntN units train their latent with full fake quantization (a = 1).
  "final"    the end of stage 2: U and V are fake-quantized to their stored integer grid
             (per-row scales, straight-through), so the forward computes exactly what the
             packed checkpoint stores; `payload()` returns those very tensors.

The value of `ste(q, x)` is exactly q (x - x.detach() is exactly zero), which is what lets
the exported artifact reproduce the trained forward bit for bit in the weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfplan.kernels.packing import pack_signs

from ..formats import quant
from ..formats.specs import Binary, IntN

PHASES = ("anneal", "correct", "final")
_FP16_MAX = 65504.0


def ste(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Forward: `value` exactly. Backward: the identity to `x` (straight-through)."""
    return value + (x - x.detach())


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the fp16 grid (saturating), keep x's dtype: what a stored fp16 scale holds."""
    return x.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(x.dtype)


def _check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    return phase


class QATLinear(nn.Module):
    """Base: a linear whose weight is `weight_eff()`; bias frozen (stored under the Keep default)."""

    def __init__(self, weight: torch.Tensor, spec, bias: torch.Tensor | None = None):
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        spec.validate((self.out_features, self.in_features))
        self._phase = "anneal"
        self.anneal = 0.0
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._phase = _check_phase(value)

    def weight_eff(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # (..., in) -> (..., out)
        w = self.weight_eff()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, spec={self.spec}, phase={self.phase}"


class QATIntNLinear(QATLinear):
    """IntN weight: latent FP weight, annealed then fully fake-quantized (stage 2)."""

    def __init__(self, weight: torch.Tensor, spec: IntN, bias: torch.Tensor | None = None):
        super().__init__(weight, spec, bias)
        self.latent = nn.Parameter(weight.detach().float().clone())

    def _quant(self) -> quant.IntNQuant:
        s = self.spec
        return quant.quantize_intn(self.latent.detach(), s.bits, s.group, s.symmetric)

    def weight_eff(self) -> torch.Tensor:
        w = self.latent
        q = quant.dequantize_intn(*self._quant())                    # (out, in), no grad
        a = self.anneal if self.phase == "anneal" else 1.0
        if a >= 1.0:
            return ste(q, w)
        return ste(torch.lerp(w.detach(), q, a), w)

    def begin_correction(self, generator: torch.Generator | None = None,
                         target: torch.Tensor | None = None) -> None:
        """Nothing changes shape: the latent keeps training under full fake quantization."""

    @torch.no_grad()
    def payload(self) -> dict[str, torch.Tensor]:
        """The stored tensors: the same quantize_intn call the forward makes."""
        s = self.spec
        q = self._quant()
        out = {"qweight": quant.pack_intn(q.q, s.bits, s.symmetric), "scale": q.scale}
        if q.zero is not None:
            out["zero"] = q.zero
        return out


class QATIntNEmbedding(QATIntNLinear):
    """IntN embedding (tied head too): forward(ids) looks rows up, attend(h) scores them."""

    def __init__(self, weight: torch.Tensor, spec: IntN):
        super().__init__(weight, spec, None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:         # (B, L) -> (B, L, d)
        return F.embedding(ids, self.weight_eff())

    def attend(self, h: torch.Tensor) -> torch.Tensor:            # (..., d) -> (..., V)
        return F.linear(h, self.weight_eff().to(h.dtype))


class QATBinaryLinear(QATLinear):
    """1-bit scaffold (row or FBI scales) + optional low-rank correction U @ V."""

    def __init__(self, weight: torch.Tensor, spec: Binary, bias: torch.Tensor | None = None):
        super().__init__(weight, spec, bias)
        self.latent = nn.Parameter(weight.detach().float().clone())
        # stage-2 tensors appear in begin_correction(); None until then
        self.register_buffer("signs", None)        # int8 (out, in) +-1, frozen
        self.register_parameter("row_scale", None)  # (out,) row scales, or
        self.register_parameter("col_scale", None)  # (in,) FBI alpha
        self.register_parameter("col_shift", None)  # (in,) FBI beta
        self.register_parameter("u", None)          # (out, r)
        self.register_parameter("v", None)          # (r, in)

    @property
    def stage2(self) -> bool:
        return self.signs is not None

    # -- stage 1 ------------------------------------------------------------------------
    def _binarize(self, w: torch.Tensor):
        if self.spec.scale == "row":
            S, rs = quant.binarize_rows(w)
            return S, (rs,), quant.scaffold_rows(S, rs)
        S, cs, sh = quant.binarize_fbi(w)
        return S, (cs, sh), quant.scaffold_fbi(S, cs, sh)

    # -- stage 2 ------------------------------------------------------------------------
    @torch.no_grad()
    def begin_correction(self, generator: torch.Generator | None = None,
                         target: torch.Tensor | None = None) -> None:
        """Freeze the scaffold at Q(latent); start U, V (spec.init) from the residual
        target - scaffold, target = the latent (default) or e.g. the teacher's weight."""
        if self.stage2:
            return
        w = self.latent.detach().float()
        S, scales, scaffold = self._binarize(w)
        if target is not None:
            w = target.detach().float().to(w.device)
        self.register_buffer("signs", S.to(torch.int8))
        if self.spec.scale == "row":
            self.row_scale = nn.Parameter(scales[0].float())
        else:
            self.col_scale = nn.Parameter(scales[0].float())
            self.col_shift = nn.Parameter(scales[1].float())
        if self.spec.rank:
            u, v = quant.lowrank_factors(w - scaffold, self.spec.rank, self.spec.init, generator)
            self.u = nn.Parameter(u.contiguous())
            self.v = nn.Parameter(v.contiguous())
        del self.latent

    def allocate_stage2(self) -> None:
        """Stage-2 tensors with the right shapes (values to be loaded from a checkpoint)."""
        if self.stage2:
            return
        o, i, r = self.out_features, self.in_features, self.spec.rank
        self.register_buffer("signs", torch.ones(o, i, dtype=torch.int8))
        if self.spec.scale == "row":
            self.row_scale = nn.Parameter(torch.zeros(o))
        else:
            self.col_scale = nn.Parameter(torch.zeros(i))
            self.col_shift = nn.Parameter(torch.zeros(i))
        if r:
            self.u = nn.Parameter(torch.zeros(o, r))
            self.v = nn.Parameter(torch.zeros(r, i))
        del self.latent

    def _scaffold_eff(self) -> torch.Tensor:
        S = self.signs.float()
        if self.spec.scale == "row":
            return S * ste(fp16_round(self.row_scale.detach()), self.row_scale).unsqueeze(-1)
        cs = ste(fp16_round(self.col_scale.detach()), self.col_scale)
        sh = ste(fp16_round(self.col_shift.detach()), self.col_shift)
        return S * cs + sh

    def _quant_factors(self) -> tuple[quant.LowRank, tuple[torch.Tensor, torch.Tensor]]:
        """Integer U, V and fp16 scales exactly as stored, and their dequantized floats."""
        b = self.spec.rank_bits
        uq, us = quant.quantize_rows_sym(self.u.detach(), b)
        vq, vs = quant.quantize_rows_sym(self.v.detach(), b)
        lr = quant.LowRank(uq, us, vq, vs)
        return lr, quant.lowrank_dequant(lr)

    def factors_eff(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.phase == "final":
            _, (u, v) = self._quant_factors()
            return ste(u, self.u), ste(v, self.v)
        return self.u, self.v

    def weight_eff(self) -> torch.Tensor:
        if not self.stage2:
            w = self.latent
            _, _, q = self._binarize(w)
            a = self.anneal if self.phase == "anneal" else 1.0
            return ste(torch.lerp(w.detach(), q, a), w)
        W = self._scaffold_eff()
        if self.spec.rank:
            u, v = self.factors_eff()
            W = W + u @ v
        return W

    @torch.no_grad()
    def payload(self) -> dict[str, torch.Tensor]:
        """The stored tensors of the "final" forward: same signs, fp16 scales, integer factors."""
        if not self.stage2:
            raise RuntimeError("payload() needs stage 2 (begin_correction) first")
        out = {"bits": pack_signs(self.signs.float())}
        if self.spec.scale == "row":
            out["row_scale"] = fp16_round(self.row_scale.detach()).to(torch.float16)
        else:
            out["col_scale"] = fp16_round(self.col_scale.detach()).to(torch.float16)
            out["col_shift"] = fp16_round(self.col_shift.detach()).to(torch.float16)
        if self.spec.rank:
            lr, _ = self._quant_factors()
            b = self.spec.rank_bits
            out.update(u=quant.pack_intn(lr.u, b, True), u_scale=lr.u_scale,
                       v=quant.pack_intn(lr.v, b, True), v_scale=lr.v_scale)
        return out



def qat_modules(model: nn.Module) -> list[tuple[str, QATLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinear)]


def set_phase(model: nn.Module, phase: str, anneal: float = 1.0) -> None:
    _check_phase(phase)
    for _, m in qat_modules(model):
        m.phase = phase
        m.anneal = float(anneal)
