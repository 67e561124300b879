"""Exact solver: the additive problem is a multiple-choice knapsack, solved as a MILP (HiGHS).

    minimise   sum_{u,c} kl[u,c] x[u,c]
    subject to sum_c x[u,c] = 1                        (one format per unit)
               sum_{u,c} bytes[u,c] x[u,c] <= budget - fixed_bytes
               x binary

scipy.optimize.milp (HiGHS branch and cut) with mip_rel_gap = 0 returns a certified optimum:
its dual bound equals the objective, and we report both. Numerics: each row's bytes are taken
relative to the unit's smallest candidate (so coefficients are the extra bytes a choice costs)
and expressed in MB; the KL objective is rescaled so its largest coefficient is 1e4, so
HiGHS's absolute tolerances (1e-6 gap, 1e-7 feasibility) are far below anything that matters.
The integer solution is then re-checked in exact integer bytes; if a tolerance let it exceed
the budget by a few bytes, the budget row is tightened by the excess and the MILP re-solved.

Choices dominated within a unit (no fewer bytes and no lower KL than another choice) are
dropped before solving; they can never be needed in an optimum. Units with identical
candidates, bytes and KL (every layer under the size-only prior) are merged into one group
whose variables count how many of its units take each choice (integers 0..group size): the
same optimum without the symmetric copies that make branch and bound slow.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dfplan.errors import DfplanError

from .space import SearchSpace
from .surrogate import Surrogate

_MB = 1e6
_OBJ_MAX = 1e4


@dataclass(frozen=True)
class MilpResult:
    assignment: dict            # unit name -> Spec
    total_bytes: int            # exact, fixed bytes included
    additive_kl: float          # sum of per-unit KL (the MILP objective)
    predicted_kl: float         # after the surrogate's correction
    budget: int
    dual_bound: float           # HiGHS's lower bound on the additive KL
    gap: float                  # relative gap; 0 = certified optimal
    status: str
    seconds: float
    resolves: int = 0           # times the budget row was tightened for exact bytes

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "additive_kl": self.additive_kl,
                "predicted_kl": self.predicted_kl, "budget": self.budget, "dual_bound": self.dual_bound,
                "gap": self.gap, "status": self.status, "seconds": self.seconds, "resolves": self.resolves}


@dataclass(frozen=True)
class _Problem:
    """Flattened MILP data: one integer variable per (group of identical units, kept choice)."""
    group_of: np.ndarray       # (n_var,) group index
    choice_of: np.ndarray      # (n_var,) index into the group's candidates
    extra_bytes: np.ndarray    # (n_var,) int64 bytes over the group's cheapest candidate
    kl: np.ndarray             # (n_var,) float64
    groups: list               # unit positions of each group, model order
    base_bytes: int            # fixed bytes + every unit's cheapest candidate
    kl_scale: float = 1.0

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(g) for g in self.groups], dtype=float)


def _problem(space: SearchSpace, sur: Surrogate) -> _Problem:
    keyed: dict[tuple, list[int]] = {}
    for ui, us in enumerate(space.units):
        k = tuple(sur.unit_kl(us.unit.name, s) for s in us.specs)
        keyed.setdefault((us.names, us.nbytes, k), []).append(ui)
    group_of, choice_of, extra, kl, groups = [], [], [], [], []
    base = space.fixed_bytes
    for gi, ((_, nb, k), members) in enumerate(keyed.items()):
        groups.append(members)
        b = np.asarray(nb, dtype=np.int64)
        k = np.asarray(k, dtype=np.float64)
        bmin = int(b.min())
        base += bmin * len(members)
        # keep a choice only if no other choice is at most as big and strictly better,
        # or equally good and strictly smaller (ties keep the first in byte order)
        best = np.inf
        for j in np.lexsort((k, b)):
            if k[j] < best:
                best = k[j]
                group_of.append(gi)
                choice_of.append(int(j))
                extra.append(int(b[j]) - bmin)
                kl.append(float(k[j]))
    kl_arr = np.asarray(kl)
    scale = float(kl_arr.max()) / _OBJ_MAX if kl_arr.size and kl_arr.max() > 0 else 1.0
    return _Problem(np.asarray(group_of), np.asarray(choice_of), np.asarray(extra, dtype=np.int64),
                    kl_arr, groups, int(base), scale)


def _solve_once(p: _Problem, capacity: int, time_limit: float):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    n = p.group_of.size
    a_eq = csr_matrix((np.ones(n), (p.group_of, np.arange(n))), shape=(len(p.groups), n))
    a_b = (p.extra_bytes / _MB).reshape(1, -1)
    cons = [LinearConstraint(a_eq, p.sizes, p.sizes), LinearConstraint(a_b, -np.inf, capacity / _MB)]
    return milp(p.kl / p.kl_scale, integrality=np.ones(n), bounds=Bounds(0, p.sizes[p.group_of]),
                constraints=cons, options={"mip_rel_gap": 0.0, "time_limit": time_limit, "presolve": True})


def solve(space: SearchSpace, sur: Surrogate, budget: int, time_limit: float = 120.0,
          _problem_cache: _Problem | None = None) -> MilpResult:
    """Certified-optimal assignment for `budget` bytes (DfplanError if none exists)."""
    space.check_budget(budget)
    t0 = time.perf_counter()
    p = _problem_cache or _problem(space, sur)
    capacity = budget - p.base_bytes
    resolves = 0
    while True:
        res = _solve_once(p, capacity, time_limit)
        if res.x is None:
            raise DfplanError(f"the MILP found no plan within the budget ({res.message}); "
                              f"raise the budget or the time limit")
        x = np.round(res.x).astype(np.int64)                  # (n_var,) units per choice
        if not np.array_equal(np.bincount(p.group_of, weights=x, minlength=len(p.groups)), p.sizes):
            raise RuntimeError(f"MILP returned an inconsistent assignment: {res.x}")
        used = int((p.extra_bytes * x).sum())
        if used <= budget - p.base_bytes:
            break
        capacity -= used - (budget - p.base_bytes)   # tolerance let it through; tighten and retry
        resolves += 1
        if resolves > 8:
            raise RuntimeError("MILP keeps exceeding the budget after tightening")
    idx = [0] * len(space.units)
    for g, members in enumerate(p.groups):
        # interleave the group's choices along depth (slot i of a choice taken n times sits at
        # (i + 0.5) / n), so e.g. the layers that get the larger rank are spread, not bunched
        slots = sorted(((i + 0.5) / x[j], int(p.choice_of[j])) for j in np.flatnonzero((p.group_of == g) & (x > 0))
                       for i in range(int(x[j])))
        for ui, (_, c) in zip(members, slots):
            idx[ui] = c
    assignment = space.assignment(idx)
    total = space.total_bytes(assignment)
    assert total == p.base_bytes + used and total <= budget
    add = sur.additive(assignment)
    dual = float(getattr(res, "mip_dual_bound", np.nan) or np.nan) * p.kl_scale
    gap = float(getattr(res, "mip_gap", np.nan) if getattr(res, "mip_gap", None) is not None else np.nan)
    status = "optimal" if res.status == 0 else f"status {res.status}: {res.message}"
    return MilpResult(assignment, total, add, sur.correction(add), budget, dual, gap, status,
                      time.perf_counter() - t0, resolves)


@dataclass(frozen=True)
class FrontPoint:
    budget: int
    total_bytes: int
    additive_kl: float
    predicted_kl: float
    assignment: dict = field(compare=False, repr=False)


def pareto_front(space: SearchSpace, sur: Surrogate, n_points: int = 24, budgets=None,
                 time_limit: float = 60.0) -> list[FrontPoint]:
    """Bytes vs predicted KL: the MILP optimum at budgets swept geometrically from the
    smallest to the largest model; non-dominated, distinct points sorted by bytes."""
    p = _problem(space, sur)
    lo = p.base_bytes
    hi = p.base_bytes + int(sum(len(m) * p.extra_bytes[p.group_of == g].max() for g, m in enumerate(p.groups)))
    if budgets is None:
        budgets = sorted({int(round(b)) for b in np.geomspace(lo, max(hi, lo + 1), max(2, n_points))})
    pts: list[FrontPoint] = []
    for b in budgets:
        if b < space.min_bytes:
            continue
        r = solve(space, sur, int(b), time_limit=time_limit, _problem_cache=p)
        pts.append(FrontPoint(int(b), r.total_bytes, r.additive_kl, r.predicted_kl, r.assignment))
    pts.sort(key=lambda q: (q.total_bytes, q.additive_kl))
    front, best = [], np.inf
    for q in pts:
        if q.additive_kl < best - 1e-15:
            front.append(q)
            best = q.additive_kl
    return front
