"""Decode with only a support: the kept rows / columns gathered once per prompt into smaller
weights, so every decode step runs the usual kernels on less work.

SSM units map onto "virtual heads" of width vhd = min(block, headdim): each keeps its head's
dt row, dt_bias and A_log (duplicated when a head is split into channel blocks), its channels'
z / x rows of in_proj, conv taps, D and norm weights, and its state rows; B and C (shared by
all heads of a group) are always kept. The fused step then runs with H' = kept virtual heads.

The gated RMSNorm of a group divides by its channel count; with channels skipped it divides by
rho * group size instead (rho = the support's share of the group's prompt pre-norm energy),
done through the kernel's own arguments: for k kept of n channels,
    rsqrt(sum_k / (n rho) + eps) = sqrt(n rho / k) * rsqrt(sum_k / k + eps n rho / k),
so norm_weight' = norm_weight * sqrt(n rho / k) and eps' = eps * n rho / k. rho is one number
per layer (the kernel takes one eps) and supports are balanced over groups, so the identity
is exact. dynamic/reference.py computes the same thing with full-size weights and masks.

Composable with a static plan: projections may be IntNLinear / BinaryLinear (slicing.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dfplan.attention import MHA, GatedMLP
from dfplan.kernels import mamba2_step
from dfplan.model import InferenceCache, Mamba2Mixer

from .slicing import slice_linear
from .units import LayerSupport, Support, UnitGroup, channels, unit_layout


def ssm_index(cfg, keep: torch.Tensor, block: int) -> dict:
    """Index tensors of a kept SSM unit set: channels (d_inner), virtual heads, their heads."""
    vhd = min(block, cfg.headdim)
    ch = channels(keep, block)                                   # (k * block,)
    vh = ch[::vhd] // vhd                                        # (H',) virtual heads
    head = ch[::vhd] // cfg.headdim                              # (H',) their real head
    return {"ch": ch, "vh": vh, "head": head, "vhd": vhd}


class SlicedMixer(nn.Module):
    """A Mamba2Mixer restricted to kept channel blocks; decode only (step)."""

    def __init__(self, mixer: Mamba2Mixer, sup: LayerSupport, block: int):
        super().__init__()
        c = mixer.cfg
        idx = ssm_index(c, sup.keep, block)
        ch, head, vhd = idx["ch"], idx["head"], idx["vhd"]
        self.cfg, self.vhd, self.ngroups, self.d_state = c, vhd, c.ngroups, c.d_state
        self.norm_before_gate = c.norm_before_gate
        self.ch, self.vh = ch, idx["vh"]
        GN, di = c.ngroups * c.d_state, c.d_inner
        bc = torch.arange(2 * di, 2 * di + 2 * GN)
        rows = torch.cat([ch, di + ch, bc, 2 * di + 2 * GN + head])      # z, x, B C, dt
        self.in_proj = slice_linear(mixer.in_proj, rows=rows)
        self.out_proj = slice_linear(mixer.out_proj, cols=ch)
        conv_rows = torch.cat([ch, torch.arange(di, di + 2 * GN)])
        w = mixer.conv1d.weight.detach()
        self.register_buffer("conv_weight", w.reshape(w.shape[0], -1)[conv_rows].contiguous())
        b = mixer.conv1d.bias
        self.register_buffer("conv_bias", None if b is None else b.detach()[conv_rows].contiguous())
        self.register_buffer("dt_bias", mixer.dt_bias.detach()[head].contiguous())
        self.register_buffer("A_log", mixer.A_log.detach()[head].contiguous())
        D = mixer.D.detach()
        self.register_buffer("D", (D[ch] if c.D_has_hdim else D[head]).contiguous())
        k, n = ch.numel(), di
        f = 1.0 if k == n and sup.rho == 1.0 else n * float(sup.rho) / k
        nw = mixer.norm.weight.detach()[ch]
        self.register_buffer("norm_weight", (nw * f ** 0.5).to(nw.dtype).contiguous() if f != 1.0
                             else nw.contiguous())
        self.eps = mixer.norm.eps * f

    def slice_cache(self, lc: dict) -> dict:
        """The kept part of a prefilled {"conv", "ssm"} layer cache (new tensors)."""
        c = self.cfg
        conv = lc["conv"]                                            # (b, conv_dim, d_conv)
        conv_rows = torch.cat([self.ch, torch.arange(c.d_inner, c.conv_dim)]).to(conv.device)
        ssm = lc["ssm"]                                              # (b, H, P, N)
        b = ssm.shape[0]
        ssm = ssm.reshape(b, c.d_inner // self.vhd, self.vhd, c.d_state)
        return {"conv": conv.index_select(1, conv_rows).contiguous(),
                "ssm": ssm.index_select(1, self.vh.to(ssm.device)).contiguous()}

    def step(self, u: torch.Tensor, cache: dict) -> torch.Tensor:   # (b, d_model) -> (b, d_model)
        y = mamba2_step(self.in_proj(u), cache["conv"], cache["ssm"], self.conv_weight,
                        self.conv_bias, self.dt_bias, self.A_log, self.D, self.norm_weight,
                        self.eps, self.ngroups, self.vhd, self.d_state,
                        norm_before_gate=self.norm_before_gate)
        return self.out_proj(y.to(u.dtype))


def sliced_mha(mha: MHA, keep: torch.Tensor) -> tuple[MHA, torch.Tensor]:
    """An MHA with only the kept kv-groups (their query heads, k and v heads); its MLP branch
    is kept whole. Returns (module, kept kv-head indices for the cache)."""
    rep, D = mha.num_heads // mha.num_heads_kv, mha.head_dim
    h, hkv = mha.num_heads, mha.num_heads_kv
    qh = (keep[:, None] * rep + torch.arange(rep)).reshape(-1)      # kept query heads
    q_rows = channels(qh, D)
    kv_rows = channels(keep, D)
    qkv = h * D + 2 * hkv * D
    rows = torch.cat([q_rows, h * D + kv_rows, h * D + hkv * D + kv_rows,
                      torch.arange(qkv, qkv + mha.mlp_dim)])
    cols = torch.cat([q_rows, torch.arange(h * D, h * D + mha.mlp_dim // 2)])
    new = copy.copy(mha)                      # same settings (rotary, scale, mlp_dim, ...)
    new._modules = dict(mha._modules)         # own module table: the original is untouched
    new._parameters, new._buffers = dict(mha._parameters), dict(mha._buffers)
    new.num_heads, new.num_heads_kv = keep.numel() * rep, keep.numel()
    new.in_proj = slice_linear(mha.in_proj, rows=rows)
    new.out_proj = slice_linear(mha.out_proj, cols=cols)
    return new, keep


def sliced_mlp(mlp: GatedMLP, keep: torch.Tensor, width: int) -> GatedMLP:
    hidden = mlp.fc2.in_features
    ch = channels(keep, width)
    new = copy.copy(mlp)
    new._modules = dict(mlp._modules)
    new.fc1 = slice_linear(mlp.fc1, rows=torch.cat([ch, hidden + ch]))   # (y, gate) halves
    new.fc2 = slice_linear(mlp.fc2, cols=ch)
    return new


class DynamicModel(nn.Module):
    """A Mamba2LM's decode path with per-layer supports; shares embedding, norms and head
    with the base model (which is left unchanged)."""

    def __init__(self, model, support: Support, layout: list[UnitGroup] | None = None,
                 block: int | None = None, mlp_block: int = 128):
        super().__init__()
        self.base = [model]                   # a list: not registered as a submodule
        layout = layout or unit_layout(model, block, mlp_block)
        by_key = {g.key: g for g in layout}
        self.kv_keep: dict[int, torch.Tensor] = {}
        blocks = []
        for i, blk in enumerate(model.backbone.layers):
            nb = copy.copy(blk)
            nb._modules = dict(blk._modules)
            g = by_key.get((i, "ssm"))
            if g is not None:
                nb.mixer = SlicedMixer(blk.mixer, support[g.key], g.width)
            g = by_key.get((i, "attn"))
            if g is not None:
                nb.mixer, self.kv_keep[i] = sliced_mha(blk.mixer, support[g.key].keep)
            g = by_key.get((i, "mlp"))
            if g is not None:
                nb.mlp = sliced_mlp(blk.mlp, support[g.key].keep, g.width)
            blocks.append(nb)
        self.blocks = nn.ModuleList(blocks)

    def slice_cache(self, cache: InferenceCache) -> InferenceCache:
        """The kept part of the full model's prefill cache (the prompt ran at full width)."""
        layers = []
        for i, (nb, lc) in enumerate(zip(self.blocks, cache.layers)):
            if isinstance(nb.mixer, SlicedMixer):
                layers.append(nb.mixer.slice_cache(lc))
            elif i in self.kv_keep and lc.get("k") is not None:
                kv = self.kv_keep[i].to(lc["k"].device)
                layers.append({"k": lc["k"].index_select(2, kv), "v": lc["v"].index_select(2, kv)})
            else:
                layers.append({k: (None if v is None else v.clone()) for k, v in lc.items()})
        return InferenceCache(cache.seqlen, layers)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """ids (b,) -> logits (b, vocab_padded); same sequence of operations as Mamba2LM.step."""
        base = self.base[0]
        hidden, residual = base.embed(ids.reshape(-1)), None
        for blk, lc in zip(self.blocks, cache.layers):
            hidden, residual = blk(hidden, residual, lc, pos=cache.seqlen)
        cache.seqlen += 1
        return base.head(hidden, residual)


def _nbytes(mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods
               for t in list(m.parameters()) + list(m.buffers()))


def bandwidth_bound_speedup(model, dyn: DynamicModel) -> float:
    """Full over sliced bytes streamed per decode step (blocks + output head): the speedup a
    purely weight-bandwidth-bound step would get; the embedding row read is negligible."""
    head = model.lm_head if model.lm_head is not None else model.backbone.embedding
    h = _nbytes([head])
    return (_nbytes(model.backbone.layers) + h) / (_nbytes(dyn.blocks) + h)


def kept_weight_fraction(model, dyn: DynamicModel) -> float:
    """Bytes of the sliced blocks' weights over the full blocks' (what a decode step streams
    through its layers; embedding and head, unchanged, excluded)."""
    return _nbytes(dyn.blocks) / max(1, _nbytes(model.backbone.layers))
