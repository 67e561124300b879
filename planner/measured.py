"""True KL of a candidate plan on held-out windows: the `--objective measured` evaluator.

A plan is applied to a copy of the teacher with the modules formats.apply.apply_plan would
swap in (quantised exactly as the packed artifact will; each (unit, format) module is built
once and reused across trials) and scored with KL(teacher || student) per token, in nats, the
quantity of dfplan.evaluate.kl_to_teacher. The teacher's log-probabilities are computed once
and kept, so each trial costs one student forward pass over the windows instead of two.

Held-out windows: the valid split of dfplan.data.split_windows with the sensitivity
analyzer's fraction (10%) and seed, so they never overlap its calibration windows.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dfplan.errors import DfplanError
from dfplan.formats.apply import apply_plan, round_to_storage_
from dfplan.formats.modules import module_for
from dfplan.formats.plan import Plan, model_signature

from .space import SearchSpace


@dataclass
class MeasuredKL:
    """Callable: assignment (unit -> spec) -> mean per-token KL(teacher || plan), nats."""
    teacher: torch.nn.Module
    windows: np.ndarray               # (N, L + 1) int64
    space: SearchSpace
    batch_size: int = 8
    calls: int = 0
    seconds: float = 0.0
    _modules: dict = field(default_factory=dict, repr=False)
    _student: torch.nn.Module | None = field(default=None, repr=False)

    def __post_init__(self):
        w = torch.as_tensor(np.asarray(self.windows), dtype=torch.long)
        if w.dim() != 2 or w.shape[1] < 2 or w.shape[0] < 1:
            raise DfplanError(f"held-out windows must be (N >= 1, L >= 2) token ids, got {tuple(w.shape)}")
        self._x = w[:, :-1]
        self._vocab = self.space.cfg.vocab_size
        self.teacher.eval()
        with torch.no_grad():
            self._t_logp = [F.log_softmax(self.teacher(b).float()[..., :self._vocab], -1)
                            for b in self._x.split(self.batch_size)]          # (b, L, V) each

    @torch.no_grad()
    def kl(self, student: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for b, lt in zip(self._x.split(self.batch_size), self._t_logp):
            ls = F.log_softmax(student(b).float()[..., :self._vocab], -1)
            total += (lt.exp() * (lt - ls)).sum().item()
            count += b.numel()
        return total / count

    @torch.no_grad()
    def _module(self, unit, spec) -> torch.nn.Module:
        """The module apply_plan would put at `unit` for `spec`, built once per (unit, spec):
        trials revisit the same formats constantly and quantising (clip search, SVD) is the
        expensive part of a trial."""
        key = (unit.name, spec.name)
        if key not in self._modules:
            src = self.teacher.get_submodule(unit.name)
            cls = module_for(spec, unit.kind)
            if cls is None:                      # Keep: the float module, values rounded
                mod = copy.deepcopy(src)
                round_to_storage_(mod.weight, getattr(torch, spec.torch_dtype_name))
            else:
                mod = cls.from_float(src.weight, spec, bias=getattr(src, "bias", None),
                                     generator=torch.Generator().manual_seed(0))
            self._modules[key] = mod.eval()
        return self._modules[key]

    def student(self, assignment) -> torch.nn.Module:
        """The teacher under `assignment`: one shared model whose units are swapped per call
        (fixed tensors rounded to the plan default once, as apply_plan does)."""
        if self._student is None:
            base = copy.deepcopy(self.teacher)
            apply_plan(base, Plan(specs={}, default=self.space.default, model=model_signature(self.space.cfg)))
            self._student = base.eval()
        for us in self.space.units:
            spec = us.specs[us.index(assignment[us.unit.name])]
            parent, _, child = us.unit.name.rpartition(".")
            setattr(self._student.get_submodule(parent) if parent else self._student, child,
                    self._module(us.unit, spec))
        return self._student

    def __call__(self, assignment) -> float:
        t0 = time.perf_counter()
        v = self.kl(self.student(assignment))
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return v
