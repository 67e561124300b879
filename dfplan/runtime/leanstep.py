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

When every in_proj / out_proj is a BinaryLinear (the DF-SSM layouts) the whole layer loop
runs in one C++ call (kernels/csrc/stack_cpu.cpp, `ext.LeanStack`): same kernels, the norm
a C++ loop, no interpreter between layers. Otherwise (other formats, or DFPLAN_LEAN_STACK=0
for A/B runs) the loop is the Python one below. That loop with cpp_norm=True (the C++ loop's
own norm, `ext.add_rms_norm_`) is the C++ loop's twin, equal bit for bit: the norm's
summation order is all that differs from torch, but a last-bit difference there can flip
the 1-bit kernels' int8 rounding of an activation, so only an equal norm lets the tests
compare the rest of the loop exactly.

Pure Mamba fp32 models on CPU with the C++ kernels only; anything else keeps model.step.
"""
from __future__ import annotations

import os

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


def _binary(mod) -> bool:
    return isinstance(mod, BinaryLinear) and not any(t.requires_grad for t in mod.buffers())


def _binary_args(mod) -> tuple:
    """binary_linear's weight arguments for a BinaryLinear: (bits, row_scale, col_scale,
    col_shift, u, u_scale, v, v_scale, bias, in_features, layout)."""
    fbi = mod.spec.scale == "fbi"
    r = mod.spec.rank > 0
    u, v = mod._correction_int8() if r else (None, None)
    return (mod.bits, None if fbi else mod.row_scale, mod.col_scale if fbi else None,
            mod.col_shift if fbi else None, u, mod.u_scale if r else None, v,
            mod.v_scale if r else None, mod.bias, mod.in_features, mod.bits_layout)


def _linear_fn(mod):
    """A call (B, in) fp32 -> (B, out) fp32 with the weights pre-bound."""
    if _binary(mod):
        bits, rs, cs, csh, u, us, v, vs, bias, in_f, layout = _binary_args(mod)
        kw = dict(col_scale=cs, col_shift=csh, u=u, u_scale=us, v=v, v_scale=vs, bias=bias)
        kernel = cpu.binary_linear_cpu

        def call(x):
            return kernel(x, bits, rs, in_f, layout=layout, **kw)
        return call
    return mod


class LeanStep:
    """Callable like model.step(ids, cache) -> logits, for the cache it was built on."""

    def __init__(self, model, cache: InferenceCache, stack: bool | None = None, cpp_norm: bool = False):
        """stack: use the C++ layer loop where it applies (None: unless DFPLAN_LEAN_STACK=0);
        cpp_norm: the Python loop's residual + norm by the C++ loop's own code (its twin)."""
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
        self.add_norm = ext.add_rms_norm_ if cpp_norm else None
        self.stack = None                   # the C++ layer loop, where every linear is 1-bit
        mixers = [blk.mixer for blk in model.backbone.layers]
        if stack is None:
            stack = os.environ.get("DFPLAN_LEAN_STACK", "1") != "0"
        if stack and all(_binary(m.in_proj) and _binary(m.out_proj) for m in mixers):
            self.stack = ext.LeanStack(cpu.best_isa(), use_avx2)
            for blk, (nw, eps, _, _, conv, ssm, args) in zip(model.backbone.layers, self.layers):
                self.stack.add_layer(nw, float(eps), conv, ssm, *args[:-1])
                self.stack.set_linear(0, *_binary_args(blk.mixer.in_proj))
                self.stack.set_linear(1, *_binary_args(blk.mixer.out_proj))

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("this LeanStep was built on another cache")
        kernel, shape = self.step_kernel, self.shape
        hidden = self.model.embed(ids.reshape(-1))                  # (B, d)
        if self.stack is not None:
            hidden, residual = self.stack.run(hidden.contiguous())
            cache.seqlen += 1
            return self.model.head(hidden, residual)
        residual = None
        for nw, eps, fin, fout, conv, ssm, args in self.layers:
            if self.add_norm is not None:
                first = residual is None
                residual = torch.empty_like(hidden) if first else residual
                h = self.add_norm(hidden, residual, first, nw, eps)
            else:
                residual = hidden if residual is None else hidden + residual
                h = F.rms_norm(residual, shape, nw, eps)
            hidden = fout(kernel(fin(h), conv, ssm, *args))
        cache.seqlen += 1
        return self.model.head(hidden, residual)


def lean_step_factory(model, cache: InferenceCache, batch: int):
    """decode(step_fn=...) hook: a LeanStep where it applies, else model.step."""
    return LeanStep(model, cache) if lean_ok(model) else model.step
