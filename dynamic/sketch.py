"""Per-unit activation energies over a prompt, and random sketches of them.

Energy of a unit = sum over the prompt's tokens of the squares of its channels at the input of
the output projection (what it contributes to the residual stream, before out_proj / fc2). For
SSM units the pre-norm energy (the gated RMSNorm's statistic) is kept too: the support's share
of it rescales the norm when units are skipped (units.LayerSupport.rho).

A sketch is y = Phi e with Phi (m, n) random: Gaussian N(0, 1/m) or Rademacher +-1/sqrt(m)
entries (both satisfy the restricted isometry property w.h.p. once m ~ C k log(n / k)), seeded
per layer so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .units import UnitGroup

SKETCHES = ("gaussian", "rademacher")


@dataclass
class Energies:
    """Per UnitGroup key: post (n_units,) energy at the out-projection input; pre (n_units,)
    the gated norm's pre-normalisation energy (SSM units only, else None)."""
    post: dict
    pre: dict


def _unit_sum(sq: torch.Tensor, g: UnitGroup) -> torch.Tensor:
    """(..., n_units * width) squares -> (n_units,) float64 sums over tokens and channels."""
    flat = sq.reshape(-1, g.n_units, g.width).double()
    return flat.sum(dim=(0, 2))


@torch.no_grad()
def prompt_energies(model, ids: torch.Tensor, layout: list[UnitGroup]):
    """Prefill `ids` (b, L) with the full model while recording unit energies.

    Returns (logits (b, L, V), InferenceCache, Energies). Hooks only observe; the outputs are
    those of model(ids, return_cache=True).
    """
    post, pre, handles = {}, {}, []
    layers = model.backbone.layers
    for g in layout:
        blk = layers[g.layer]
        if g.kind == "ssm":
            norm = blk.mixer.norm

            def hook(mod, args, out, g=g):
                x, z = args
                p = x.float() if mod.norm_before_gate else x.float() * F.silu(z.float())
                pre[g.key] = _unit_sum(p.pow(2), g)
                post[g.key] = _unit_sum(out.float().pow(2), g)
            handles.append(norm.register_forward_hook(hook))
        else:
            proj = blk.mixer.out_proj if g.kind == "attn" else blk.mlp.fc2
            n_ch = g.n_units * g.width   # attention out_proj also takes the MHA's MLP branch

            def pre_hook(mod, args, g=g, n_ch=n_ch):
                post[g.key] = _unit_sum(args[0][..., :n_ch].float().pow(2), g)
            handles.append(proj.register_forward_pre_hook(pre_hook))
    try:
        logits, cache = model(ids, return_cache=True)
    finally:
        for h in handles:
            h.remove()
    return logits, cache, Energies(post, {k: v for k, v in pre.items()})


def sketch_matrix(m: int, n: int, kind: str = "gaussian",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Phi (m, n) float64 with unit expected column norm."""
    if kind == "gaussian":
        return torch.randn(m, n, generator=generator, dtype=torch.float64) / m ** 0.5
    if kind == "rademacher":
        s = torch.randint(0, 2, (m, n), generator=generator, dtype=torch.int64).double()
        return (2 * s - 1) / m ** 0.5
    raise ValueError(f"sketch kind {kind!r} is not one of {SKETCHES}")


def measure(phi: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The m linear measurements y = Phi e of an energy vector e (n,)."""
    return phi @ e.double()
