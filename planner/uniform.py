"""Uniform allocations: every linear at one format, the baselines a searched plan must beat.

"All bin+r16", "all int4", "all int2", ...: every linear unit (in_proj, out_proj, attention,
MLP) takes the same format; the embedding / lm_head, which cannot be binary, take int8 (the
DF-SSM choice) when it is a candidate and otherwise their cheapest candidate. Each comes with
its exact bytes and predicted KL, so the exact solver can be run at the same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dfplan.formats.units import HEAD_KINDS

from .space import SearchSpace
from .surrogate import Surrogate


@dataclass(frozen=True)
class Uniform:
    name: str                   # e.g. "bin+r16 (embedding int8)"
    spec: str
    total_bytes: int
    predicted_kl: float
    additive_kl: float
    assignment: dict = field(compare=False, repr=False)


def _head_choice(us) -> str:
    return "int8" if "int8" in us.names else us.names[0]


def uniform_allocations(space: SearchSpace, sur: Surrogate, budget: int | None = None) -> list[Uniform]:
    """Every format that all linear units can take; only those within `budget` if given."""
    linears = [u for u in space.units if u.unit.kind not in HEAD_KINDS]
    heads = [u for u in space.units if u.unit.kind in HEAD_KINDS]
    if not linears:
        return []
    common = [n for n in linears[0].names if all(n in u.names for u in linears[1:])]
    out = []
    for name in common:
        a = {u.unit.name: name for u in linears}
        a.update({u.unit.name: _head_choice(u) for u in heads})
        nbytes = space.total_bytes(a)
        if budget is not None and nbytes > budget:
            continue
        add = sur.additive(a)
        head = ", ".join(sorted({_head_choice(u) for u in heads}))
        label = f"{name} (embedding {head})" if heads else name
        out.append(Uniform(label, name, nbytes, sur.correction(add), add, a))
    out.sort(key=lambda u: u.total_bytes)
    return out
