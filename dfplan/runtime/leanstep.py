"""The CPU decode step with nothing but the layers on its hot path.

model.step goes through Block.forward, the RMSNorm module (six small ops), dict lookups of
the cache and the kernels' argument validation on every call. LeanStep binds, once per
decode, everything a token needs: per layer the norm weight, the in_proj / out_proj calls
(the C++ 1-bit kernel with its tensors pre-bound, or the module itself for other formats),
the layer's conv window and SSM state, and the fused step's arguments. Per token it runs the
embedding, then per layer: residual add, one fused rms_norm, in_proj, fused SSM step,
out_proj; then the head. Same kernels, same tensors as model.step; the norm is torch's
fused rms_norm (same formula, another summation order), so logits agree to ~1e-6, not bit
for bit (tests compare both ways).

Pure Mamba fp32 models on CPU with the C++ kernels only; anything else keeps model.step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats.modules import BinaryLinear
from ..kernels import cpu, select_backend
from ..model import InferenceCache


def lean_ok(model) -> bool:
    cfg = model.config
    dev = model.backbone.norm_f.weight.device
    if dev.type != "cpu" or cfg.attn_layer_idx or cfg.d_intermediate or not cfg.residual_in_fp32:
        return False
    if select_backend(torch.empty(0)) != "cpu":
        return False
    for blk in model.backbone.layers:
        m = blk.mixer
        for t in (blk.norm.weight, m.conv1d.weight, m.dt_bias, m.A_log, m.D, m.norm.weight):
            if t.dtype != torch.float32:
                return False
    return True


def _linear_fn(mod):
    """A call (B, in) fp32 -> (B, out) fp32 with the weights pre-bound."""
    if isinstance(mod, BinaryLinear) and not any(t.requires_grad for t in mod.buffers()):
        fbi = mod.spec.scale == "fbi"
        r = mod.spec.rank > 0
        u, v = mod._correction_int8() if r else (None, None)
        kw = dict(col_scale=mod.col_scale if fbi else None, col_shift=mod.col_shift if fbi else None,
                  u=u, u_scale=mod.u_scale if r else None, v=v, v_scale=mod.v_scale if r else None,
                  bias=mod.bias)
        bits, row_scale, in_f = mod.bits, None if fbi else mod.row_scale, mod.in_features
        kernel, layout = cpu.binary_linear_cpu, mod.bits_layout

        def call(x):
            return kernel(x, bits, row_scale, in_f, layout=layout, **kw)
        return call
    return mod


class LeanStep:
    """Callable like model.step(ids, cache) -> logits, for the cache it was built on."""

    def __init__(self, model, cache: InferenceCache):
        self.model, self.cache = model, cache
        ext = cpu.extension()
        use_avx2 = cpu.best_isa() >= 1
        self.layers = []
        for blk, lc in zip(model.backbone.layers, cache.layers):
            m, c = blk.mixer, blk.mixer.cfg
            args = (m.conv1d.weight.reshape(c.conv_dim, -1), m.conv1d.bias, m.dt_bias, m.A_log,
                    m.D, m.norm.weight, float(m.norm.eps), int(c.ngroups), int(c.headdim),
                    int(c.d_state), bool(c.norm_before_gate), use_avx2)
            self.layers.append((blk.norm.weight, blk.norm.eps, _linear_fn(m.in_proj),
                                _linear_fn(m.out_proj), lc["conv"], lc["ssm"], args))
        self.step_kernel = ext.mamba2_step
        self.shape = (model.config.d_model,)

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("this LeanStep was built on another cache")
        kernel, shape = self.step_kernel, self.shape
        hidden = self.model.embed(ids.reshape(-1))                  # (B, d)
        residual = None
        for nw, eps, fin, fout, conv, ssm, args in self.layers:
            residual = hidden if residual is None else hidden + residual
            h = F.rms_norm(residual, shape, nw, eps)
            hidden = fout(kernel(fin(h), conv, ssm, *args))
        cache.seqlen += 1
        return self.model.head(hidden, residual)


def lean_step_factory(model, cache: InferenceCache, batch: int):
    """decode(step_fn=...) hook: a LeanStep where it applies, else model.step."""
    return LeanStep(model, cache) if lean_ok(model) else model.step
