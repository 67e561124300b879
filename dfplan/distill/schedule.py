"""The DF-SSM schedule as a pure function of the step: stage, phase, anneal level, learning rate.

Nothing here is state: a resumed run recomputes exactly what an uninterrupted run would have
used at the same step, so the checkpoint only needs the step counter.

  steps [0, stage1)            stage 1, phase "anneal": a = min(1, (s + 1) / anneal_steps)
  steps [stage1, final_start)  stage 2, phase "correct": frozen scaffold, float corrections
  steps [final_start, total)   stage 2, phase "final": integer corrections in the forward
Each stage has its own warmup + cosine learning-rate curve (a fresh optimizer starts stage 2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import DfplanError
from ..lr import lr_factor


@dataclass(frozen=True)
class Schedule:
    total: int
    stage1: int              # steps of stage 1 (may be 0)
    anneal_steps: int        # stage-1 steps over which a ramps to 1
    final_start: int         # first step with integer corrections in the forward
    warmup: int              # per-stage warmup cap
    min_lr_ratio: float = 0.1

    @classmethod
    def make(cls, tokens: int, tokens_per_step: int, stage1_fraction: float, anneal_fraction: float,
             final_fraction: float, warmup: int = 20, min_lr_ratio: float = 0.1) -> "Schedule":
        if tokens <= 0:
            raise DfplanError(f"token budget must be positive, got {tokens}; pass --tokens N (e.g. 2M)")
        for name, v, lo_open in (("stage-1 fraction", stage1_fraction, False),
                                 ("anneal fraction", anneal_fraction, True),
                                 ("final fraction", final_fraction, True)):
            if not (0.0 < v <= 1.0 if lo_open else 0.0 <= v < 1.0):
                interval = "(0, 1]" if lo_open else "[0, 1)"
                raise DfplanError(f"{name} must be in {interval}, got {v}")
        total = max(2 if stage1_fraction > 0 else 1, math.ceil(tokens / tokens_per_step))
        stage1 = min(total - 1, round(stage1_fraction * total))
        if stage1_fraction > 0:
            stage1 = max(1, stage1)
        stage2 = total - stage1
        final = min(stage2, max(1, round(final_fraction * stage2)))
        anneal = max(1, round(anneal_fraction * stage1)) if stage1 else 0
        return cls(total, stage1, anneal, total - final, warmup, min_lr_ratio)

    def stage(self, step: int) -> int:
        return 1 if step < self.stage1 else 2

    def phase(self, step: int) -> str:
        if step < self.stage1:
            return "anneal"
        return "final" if step >= self.final_start else "correct"

    def anneal(self, step: int) -> float:
        if step >= self.stage1:
            return 1.0
        return min(1.0, (step + 1) / self.anneal_steps)

    def lr_factor(self, step: int) -> float:
        """Warmup then cosine to min_lr_ratio, restarted at the stage boundary."""
        if step < self.stage1:
            i, n = step, self.stage1
        else:
            i, n = step - self.stage1, self.total - self.stage1
        warm = min(self.warmup, max(1, n // 10))
        return lr_factor(i, warm, n, self.min_lr_ratio)

    def to_dict(self) -> dict:
        return asdict(self)
