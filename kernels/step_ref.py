"""Pure-torch reference twin of the Mamba-2 decode step (triton_step.py, csrc/step_cpu.cpp):
slow, obviously correct, any device; the fused kernels are tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# --- Mamba-2 decode step --------------------------------------------------------------------

def mamba2_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                    norm_weight, eps, ngroups, headdim, d_state, *,
                    norm_before_gate: bool = False) -> torch.Tensor:
    """One token of the Mamba-2 mixer between in_proj and out_proj.

    zxbcdt (B, d_in_proj) = [z (d_inner), xBC (conv_dim), dt (H)]; conv_state (B, conv_dim,
    d_conv) and ssm_state (B, H, P, N) are updated in place; conv_weight (conv_dim, d_conv)
    (or nn.Conv1d's (conv_dim, 1, d_conv)); conv_bias (conv_dim,) or None; dt_bias, A_log (H,);
    D (H,) or (d_inner,); norm_weight (d_inner,). Returns y (B, d_inner) in zxbcdt's dtype:
    RMSNorm(y * silu(z)) * norm_weight per group of d_inner / ngroups channels.
    """
    H = dt_bias.shape[0]
    d_inner = H * headdim
    conv_dim = conv_state.shape[1]
    if zxbcdt.shape[-1] != d_inner + conv_dim + H or conv_dim != d_inner + 2 * ngroups * d_state:
        raise ValueError(f"zxbcdt width {zxbcdt.shape[-1]} does not match d_inner={d_inner}, "
                         f"conv_dim={conv_dim}, nheads={H}")
    Bsz = zxbcdt.shape[0]
    z, xBC, dt = zxbcdt.split([d_inner, conv_dim, H], dim=-1)
    w = conv_weight.reshape(conv_dim, -1)                           # (conv_dim, d_conv)
    # conv: shift the window left by one, append this token, take the dot with the taps
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[..., -1] = xBC
    xBC = (conv_state * w).sum(-1)
    if conv_bias is not None:
        xBC = xBC + conv_bias
    xBC = F.silu(xBC)
    x, Bm, Cm = xBC.split([d_inner, ngroups * d_state, ngroups * d_state], dim=-1)
    x = x.reshape(Bsz, H, headdim).float()                         # (B, H, P)
    hpg = H // ngroups
    Bh = Bm.reshape(Bsz, ngroups, d_state).float().repeat_interleave(hpg, dim=1)  # (B, H, N)
    Ch = Cm.reshape(Bsz, ngroups, d_state).float().repeat_interleave(hpg, dim=1)  # (B, H, N)
    dt = F.softplus(dt.float() + dt_bias.float())                   # (B, H)
    dA = torch.exp(dt * -torch.exp(A_log.float()))                  # (B, H)
    new = ssm_state.float() * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    ssm_state.copy_(new)                                            # (B, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)                      # (B, H, P)
    Df = D.float()
    y = y + x * (Df.reshape(H, headdim) if Df.numel() == d_inner else Df[:, None])
    y = y.reshape(Bsz, d_inner).to(zxbcdt.dtype)
    # gated RMSNorm, statistics per SSM group
    yf, zf = y.float(), z.float()
    if not norm_before_gate:
        yf = yf * F.silu(zf)
    g = yf.reshape(Bsz, ngroups, d_inner // ngroups)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    out = g.reshape(Bsz, d_inner) * norm_weight.float()
    if norm_before_gate:
        out = out * F.silu(zf)
    return out.to(zxbcdt.dtype)
