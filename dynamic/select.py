"""Per-prompt supports from prompt energies: oracle (top-k by true energy), random, and
compressed-sensing (top-k recovered from m random measurements of the energies)."""
from __future__ import annotations

import zlib

import torch

from .recovery import recover_support
from .sketch import Energies, measure, sketch_matrix
from .units import LayerSupport, Support, UnitGroup, n_kept, random_balanced, top_k_balanced

SUPPORTS = ("oracle", "random", "sketch")


def rho_of(energies: Energies, g: UnitGroup, keep: torch.Tensor) -> float:
    """The kept units' share of the layer's pre-norm energy (1 for non-SSM or full support)."""
    if g.kind != "ssm" or keep.numel() == g.n_units:
        return 1.0
    pre = energies.pre[g.key]
    tot = float(pre.sum())
    return float(pre[keep].sum()) / tot if tot > 0 else keep.numel() / g.n_units


def _layer_seed(seed: int, g: UnitGroup) -> int:
    return zlib.crc32(f"{seed}:{g.layer}:{g.kind}".encode())


def n_measurements(g: UnitGroup, m_frac: float) -> int:
    return max(1, min(g.n_units, round(m_frac * g.n_units)))


def make_support(kind: str, layout: list[UnitGroup], energies: Energies, fraction: float, *,
                 m_frac: float | None = None, sketch: str = "gaussian", method: str = "omp",
                 seed: int = 0) -> Support:
    """A support keeping `fraction` of every layer's units, chosen by `kind` (SUPPORTS)."""
    sup = {}
    for g in layout:
        k = n_kept(g, fraction)
        e = energies.post[g.key]
        if kind == "oracle":
            keep = top_k_balanced(e, k, g.balance)
        elif kind == "random":
            gen = torch.Generator().manual_seed(_layer_seed(seed, g))
            keep = random_balanced(g.n_units, k, g.balance, gen)
        elif kind == "sketch":
            gen = torch.Generator().manual_seed(_layer_seed(seed, g))
            phi = sketch_matrix(n_measurements(g, m_frac), g.n_units, sketch, gen)
            keep = recover_support(phi, measure(phi, e), k, method, g.balance)
        else:
            raise ValueError(f"support kind {kind!r} is not one of {SUPPORTS}")
        sup[g.key] = LayerSupport(keep, rho_of(energies, g, keep))
    return sup


def support_stats(layout: list[UnitGroup], energies: Energies, support: Support,
                  oracle: Support) -> dict:
    """Mean over layers of: energy captured (share of the layer's energy in the support),
    that share over the oracle's, and recall of the oracle's units."""
    cap, rel, rec = [], [], []
    for g in layout:
        e = energies.post[g.key]
        tot = float(e.sum()) or 1.0
        keep, ok = support[g.key].keep, oracle[g.key].keep
        c, co = float(e[keep].sum()) / tot, float(e[ok].sum()) / tot
        cap.append(c)
        rel.append(c / co if co > 0 else 1.0)
        rec.append(len(set(keep.tolist()) & set(ok.tolist())) / max(1, ok.numel()))
    n = max(1, len(layout))
    return {"energy_captured": sum(cap) / n, "energy_vs_oracle": sum(rel) / n,
            "oracle_recall": sum(rec) / n}
