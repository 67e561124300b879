"""Which structured units a layer has, and a per-prompt support over them.

A unit is a block of channels at the input of a layer's output projection, so dropping it
removes whole rows of the input projection and whole columns of the output projection:
- "ssm":  `block` consecutive d_inner channels of a Mamba-2 mixer (default: one SSM head);
          a unit never straddles an SSM norm group, and a support keeps the same number of
          units in every group (the fused step and the gated RMSNorm need equal groups);
- "attn": one kv-group of an attention layer (its query heads, its k and v head);
- "mlp":  `mlp_block` hidden channels of a gated MLP (rows of fc1's two halves, fc2 columns).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dfplan.attention import MHA, GatedMLP
from dfplan.errors import DfplanError
from dfplan.model import Mamba2Mixer


@dataclass(frozen=True)
class UnitGroup:
    """The units of one module: layer index, kind, how many, channels each."""
    layer: int
    kind: str           # "ssm" | "attn" | "mlp"
    n_units: int
    width: int          # channels per unit at the output projection's input
    balance: int = 1    # supports keep n_kept / balance units in each of `balance` equal slices

    @property
    def key(self) -> tuple[int, str]:
        return self.layer, self.kind


@dataclass
class LayerSupport:
    """Kept unit indices (sorted, int64) of one UnitGroup, and for "ssm" the fraction `rho` of
    the group's pre-norm energy they carry (the norm statistic divides by rho * group size, so
    skipped channels are accounted for by their prompt share instead of counted as zero)."""
    keep: torch.Tensor
    rho: float = 1.0


Support = dict  # (layer, kind) -> LayerSupport


def ssm_block(mixer: Mamba2Mixer, block: int | None) -> int:
    """Validate the SSM unit width: it must divide, or be a multiple of, headdim, and divide a
    norm group's channels."""
    c = mixer.cfg
    b = c.headdim if block is None else int(block)
    if b <= 0 or (c.headdim % b and b % c.headdim):
        raise DfplanError(f"--block {b} must divide headdim={c.headdim} or be a multiple of it")
    if (c.d_inner // c.ngroups) % b:
        raise DfplanError(f"--block {b} does not divide the {c.d_inner // c.ngroups} channels "
                          f"of an SSM norm group (d_inner={c.d_inner}, ngroups={c.ngroups})")
    return b


def unit_layout(model, block: int | None = None, mlp_block: int = 128) -> list[UnitGroup]:
    """The UnitGroups of a Mamba2LM, in layer order (mixer, then MLP)."""
    groups = []
    for i, blk in enumerate(model.backbone.layers):
        mix = blk.mixer
        if isinstance(mix, Mamba2Mixer):
            b = ssm_block(mix, block)
            groups.append(UnitGroup(i, "ssm", mix.cfg.d_inner // b, b, mix.cfg.ngroups))
        elif isinstance(mix, MHA):
            rep = mix.num_heads // mix.num_heads_kv
            groups.append(UnitGroup(i, "attn", mix.num_heads_kv, rep * mix.head_dim))
        else:
            raise DfplanError(f"layer {i}: unsupported mixer {type(mix).__name__}")
        if isinstance(blk.mlp, GatedMLP):
            hidden = blk.mlp.fc2.in_features
            if hidden % mlp_block:
                raise DfplanError(f"--mlp-block {mlp_block} does not divide the MLP hidden size {hidden}")
            groups.append(UnitGroup(i, "mlp", hidden // mlp_block, mlp_block))
    return groups


def n_kept(group: UnitGroup, fraction: float) -> int:
    """Units kept for a fraction: at least one per balance slice, a multiple of `balance`."""
    per = max(1, round(fraction * group.n_units / group.balance))
    return min(group.n_units, per * group.balance)


def full_support(layout: list[UnitGroup]) -> Support:
    return {g.key: LayerSupport(torch.arange(g.n_units), 1.0) for g in layout}


def top_k_balanced(scores: torch.Tensor, k: int, balance: int = 1) -> torch.Tensor:
    """Sorted indices of the k highest scores, k / balance from each equal slice."""
    n = scores.numel()
    if k % balance or n % balance:
        raise DfplanError(f"cannot keep {k} of {n} units evenly over {balance} groups")
    per = k // balance
    sl = scores.reshape(balance, n // balance)
    idx = sl.topk(per, dim=1).indices + torch.arange(balance)[:, None] * (n // balance)
    return idx.reshape(-1).sort().values


def random_balanced(n: int, k: int, balance: int, gen: torch.Generator) -> torch.Tensor:
    """k units chosen uniformly at random, k / balance per slice."""
    return top_k_balanced(torch.rand(n, generator=gen), k, balance)


def channels(keep: torch.Tensor, width: int) -> torch.Tensor:
    """Unit indices -> the channel indices they cover (sorted units give sorted channels)."""
    return (keep[:, None] * width + torch.arange(width)).reshape(-1)
