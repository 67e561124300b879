"""Reference twin of masked.py: the masked computation with full-size weights.

Skipped units are computed and then zeroed (SSM channels before the gated norm, attention
context channels and MLP hidden channels before the output projection); the SSM norm of a
group divides its kept sum of squares by rho * group size (masked.py explains why). Slow,
plain torch, states updated in place like the real step; tests compare masked.DynamicModel
against it on random inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfplan.model import InferenceCache

from .units import Support, UnitGroup, channels


def masked_mixer_step_ref(mixer, ch_mask: torch.Tensor, rho: float, u: torch.Tensor,
                          lc: dict) -> torch.Tensor:
    """u (b, d_model) -> (b, d_model); ch_mask (d_inner,) bool of kept channels."""
    c = mixer.cfg
    H, P, N, G, di = c.nheads, c.headdim, c.d_state, c.ngroups, c.d_inner
    z, xBC, dt = mixer.in_proj(u).float().split([di, c.conv_dim, H], dim=-1)
    conv = lc["conv"]                                               # (b, conv_dim, d_conv)
    conv.copy_(torch.roll(conv, shifts=-1, dims=-1))
    conv[..., -1] = xBC
    xBC = (conv.float() * mixer.conv1d.weight.float().reshape(c.conv_dim, -1)).sum(-1)
    if mixer.conv1d.bias is not None:
        xBC = xBC + mixer.conv1d.bias.float()
    x, Bm, Cm = F.silu(xBC).split([di, G * N, G * N], dim=-1)
    b = u.shape[0]
    x = x.reshape(b, H, P)
    Bh = Bm.reshape(b, G, N).repeat_interleave(H // G, dim=1)       # (b, H, N)
    Ch = Cm.reshape(b, G, N).repeat_interleave(H // G, dim=1)
    dt = F.softplus(dt + mixer.dt_bias.float())                     # (b, H)
    dA = torch.exp(-dt * torch.exp(mixer.A_log.float()))
    s = lc["ssm"].float() * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    lc["ssm"].copy_(s)                                              # (b, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", s, Ch) + mixer._skip(x)
    y = y.reshape(b, di) * ch_mask.float()                          # skipped channels: 0
    zf = z
    if not c.norm_before_gate:
        y = y * F.silu(zf)
    g = y.reshape(b, G, di // G)
    ms = g.pow(2).sum(-1, keepdim=True) / (rho * (di // G))
    out = (g * torch.rsqrt(ms + mixer.norm.eps)).reshape(b, di) * mixer.norm.weight.float()
    if c.norm_before_gate:
        out = out * F.silu(zf)
    return mixer.out_proj(out.to(u.dtype))


def _zero_cols(mask: torch.Tensor):
    def pre_hook(mod, args):
        x = args[0]
        m = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
        m[: mask.numel()] = mask.to(x.dtype)                          # MHA's MLP branch stays
        return (x * m,)
    return pre_hook


def _mask(g: UnitGroup, keep: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(g.n_units * g.width, dtype=torch.bool)
    m[channels(keep, g.width)] = True
    return m


@torch.no_grad()
def masked_step_ref(model, support: Support, layout: list[UnitGroup], ids: torch.Tensor,
                    cache: InferenceCache) -> torch.Tensor:
    """One decode step of `model` with the support applied by masks (full-size cache)."""
    layers = model.backbone.layers
    ssm_masks, handles = {}, []
    for g in layout:
        sup = support[g.key]
        if g.kind == "ssm":
            ssm_masks[g.layer] = (_mask(g, sup.keep), float(sup.rho))
        else:
            proj = layers[g.layer].mixer.out_proj if g.kind == "attn" else layers[g.layer].mlp.fc2
            handles.append(proj.register_forward_pre_hook(_zero_cols(_mask(g, sup.keep))))
    try:
        hidden, residual = model.embed(ids.reshape(-1)), None
        for i, (blk, lc) in enumerate(zip(layers, cache.layers)):
            residual = blk._add(hidden, residual)                   # Block.forward, pos given
            h = blk.norm(residual.to(blk.norm.weight.dtype))
            if blk.is_attention:
                h = blk.mixer.step(h, lc, cache.seqlen)
            else:
                mask, rho = ssm_masks[i]
                h = masked_mixer_step_ref(blk.mixer, mask.to(h.device), rho, h, lc)
            if blk.mlp is not None:
                residual = blk._add(h, residual)
                h = blk.mlp(blk.norm2(residual.to(blk.norm2.weight.dtype)))
            hidden = h
    finally:
        for hd in handles:
            hd.remove()
    cache.seqlen += 1
    return model.head(hidden, residual)
