"""The search space: per compressible unit, its candidate formats and their exact bytes.

Bytes come from spec.nbytes(unit.shape) (the packed writer's own accounting) and the fixed
tensors (norms, conv1d, A_log, D, dt_bias, biases) are counted once from
formats.size.plan_bytes, so space.total_bytes(choice) == plan_bytes(cfg, plan).total_bytes
to the byte for every choice. The MILP and Optuna both work on these integers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.plan import Plan, model_signature
from dfplan.formats.size import plan_bytes
from dfplan.formats.specs import DEFAULT_CANDIDATES, Keep, Spec
from dfplan.formats.units import Unit, allowed_specs, compressible_units
from dfplan.sizes import format_bytes


@dataclass(frozen=True)
class UnitSpace:
    unit: Unit
    specs: tuple            # candidate Specs, sorted by bytes (ties by name)
    nbytes: tuple           # exact bytes of each candidate, same order

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def index(self, spec: Spec | str) -> int:
        name = spec if isinstance(spec, str) else spec.name
        try:
            return self.names.index(name)
        except ValueError:
            raise DfplanError(f"{self.unit.name}: format {name} is not among its candidates "
                              f"({', '.join(self.names)})") from None


@dataclass(frozen=True)
class SearchSpace:
    cfg: Mamba2Config
    units: tuple                    # UnitSpace per compressible unit, model order
    fixed_bytes: int                # everything no plan compresses, stored in `default`
    default: Keep = Keep("fp16")
    _pos: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self._pos.update({u.unit.name: i for i, u in enumerate(self.units)})

    # sizes --------------------------------------------------------------------------
    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(u.nbytes) for u in self.units)

    @property
    def max_bytes(self) -> int:
        return self.fixed_bytes + sum(max(u.nbytes) for u in self.units)

    def __getitem__(self, name: str) -> UnitSpace:
        try:
            return self.units[self._pos[name]]
        except KeyError:
            raise DfplanError(f"{name} is not a compressible unit of model {self.cfg.name}") from None

    @property
    def unit_names(self) -> list[str]:
        return [u.unit.name for u in self.units]

    def total_bytes(self, assignment: Mapping[str, Spec | str]) -> int:
        """Exact packed bytes of a full assignment unit name -> spec (or spec name)."""
        self._check_complete(assignment)
        return self.fixed_bytes + sum(u.nbytes[u.index(assignment[u.unit.name])] for u in self.units)

    def indices(self, assignment: Mapping[str, Spec | str]) -> list[int]:
        self._check_complete(assignment)
        return [u.index(assignment[u.unit.name]) for u in self.units]

    def assignment(self, indices: Sequence[int]) -> dict[str, Spec]:
        return {u.unit.name: u.specs[int(i)] for u, i in zip(self.units, indices)}

    def check_budget(self, budget: int) -> None:
        if budget < self.min_bytes:
            raise DfplanError(f"budget {format_bytes(budget)} is below the minimum "
                              f"{format_bytes(self.min_bytes)} for this model "
                              f"({self.cfg.name}: every unit at its smallest candidate + fixed tensors)")

    def _check_complete(self, assignment: Mapping) -> None:
        missing = [n for n in self._pos if n not in assignment]
        if missing:
            raise DfplanError(f"assignment lacks {len(missing)} unit(s), e.g. {missing[0]}")

    # plans --------------------------------------------------------------------------
    def to_plan(self, assignment: Mapping[str, Spec | str], **meta) -> Plan:
        """A plan naming every unit explicitly, with its exact predicted bytes."""
        specs = {u.unit.name: u.specs[u.index(assignment[u.unit.name])] for u in self.units}
        return Plan(specs=specs, default=self.default, model=model_signature(self.cfg),
                    predicted_bytes=self.total_bytes(specs), **meta)


def candidate_specs(unit: Unit, candidates: Iterable[Spec] = DEFAULT_CANDIDATES) -> list[Spec]:
    """The candidates a unit may take: allowed for its kind and valid for its shape."""
    ok = allowed_specs(unit)
    out = []
    for s in candidates:
        try:
            s.validate(unit.shape)
        except DfplanError:
            continue
        if ok(s):
            out.append(s)
    return out


def build_space(cfg: Mamba2Config, candidates: Iterable[Spec] | Mapping[str, Iterable[Spec]] = DEFAULT_CANDIDATES,
                default: Keep = Keep("fp16")) -> SearchSpace:
    """Search space of `cfg`. `candidates` is one list for all units or a per-unit mapping
    (e.g. the specs a sensitivity table measured for that unit); either is filtered by what
    each unit allows. Duplicate formats (same name) are kept once."""
    units = compressible_units(cfg)
    per_unit = isinstance(candidates, Mapping)
    if not per_unit:
        candidates = tuple(candidates)
    spaces = []
    for u in units:
        cands = candidates.get(u.name, ()) if per_unit else candidates
        uniq = {s.name: s for s in cands}
        specs = candidate_specs(u, uniq.values())
        if not specs:
            raise DfplanError(f"{u.name} ({u.kind}, shape {u.shape}) has no allowed candidate format; "
                              f"candidates given: {', '.join(uniq) or 'none'}")
        specs.sort(key=lambda s: (s.nbytes(u.shape), s.name))
        spaces.append(UnitSpace(u, tuple(specs), tuple(s.nbytes(u.shape) for s in specs)))
    # fixed bytes from the size accounting itself, so the two can never drift apart
    probe = Plan(specs={s.unit.name: s.specs[0] for s in spaces}, default=default,
                 model=model_signature(cfg))
    total = plan_bytes(cfg, probe).total_bytes
    fixed = total - sum(s.nbytes[0] for s in spaces)
    return SearchSpace(cfg, tuple(spaces), int(fixed), default)
