"""Phases along depth, as the DF-SSM knowledge analysis describes them (BRIEF.md):

  categorisation  early blocks where the prompt's category becomes linearly decodable
                  (nearest-centroid accuracy) before the answer is readable in the logit lens;
  recall          blocks where the answer appears in the logit-lens readout;
  formatting      the blocks after recall, up to the output.

Made operational on per-block curves (blocks 0 .. n_layer-1; the embedding row is a
baseline, not a phase), with the 10%-90% rise of a curve as its transition:
  recall          from the first block where the share of prompts with the answer in the
                  lens's top-k has risen 10% of the way from its low to its peak, to the
                  first block where it has risen 90% (running maximum, so a dip does not
                  end the phase early); None when the peak share is below `min_recall`;
  formatting      the blocks after recall; None when recall ends at the last block;
  categorisation  blocks 0 .. the first block where accuracy has risen 90% of the way from
                  chance to its peak; None when the peak is not clearly above chance.
The thresholds are ours: the DF-SSM analysis names the phases, not a rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Phases:
    categorisation: tuple[int, int] | None
    recall: tuple[int, int] | None
    formatting: tuple[int, int] | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _rise(curve: list[float], lo_frac: float, hi_frac: float, floor: float | None = None):
    """-> (first index reaching lo, first index reaching hi) of the running maximum, measured
    from `floor` (default: the curve's minimum before its peak) to the peak."""
    peak = max(curve)
    ipeak = curve.index(peak)
    base = min(curve[:ipeak + 1]) if floor is None else floor
    env, m = [], -float("inf")
    for v in curve:
        m = max(m, v)
        env.append(m)
    lo = next(i for i, v in enumerate(env) if v >= base + lo_frac * (peak - base))
    hi = next(i for i, v in enumerate(env) if v >= base + hi_frac * (peak - base))
    return lo, hi


def detect_phases(accuracy: list[float], recall_rate: list[float], chance: float,
                  min_recall: float = 0.05, min_accuracy_gain: float = 0.2) -> Phases:
    """accuracy, recall_rate: per block (index = block). chance: 1 / categories."""
    n = len(accuracy)
    notes = []
    recall = formatting = categorisation = None
    if max(recall_rate) < min_recall:
        notes.append(f"the answer reaches the top-k for at most {max(recall_rate):.1%} of prompts at any "
                     f"block (< {min_recall:.0%}): no recall phase (the model does not know these facts)")
    else:
        recall = _rise(recall_rate, 0.1, 0.9)
        if recall[1] < n - 1:
            formatting = (recall[1] + 1, n - 1)
        else:
            notes.append("the answer's top-k share still rises at the last block: no formatting phase")
    acc_peak = max(accuracy)
    if acc_peak - chance < min_accuracy_gain * (1 - chance):
        notes.append(f"category accuracy peaks at {acc_peak:.1%} (chance {chance:.1%}): no categorisation phase")
    else:
        categorisation = (0, _rise(accuracy, 0.0, 0.9, floor=chance)[1])
        if recall is not None and categorisation[1] >= recall[0]:
            notes.append(f"categories become decodable (block {categorisation[1]}) only once recall has begun "
                         f"(block {recall[0]}): categorisation and recall overlap")
    return Phases(categorisation, recall, formatting, notes)


def phase_of(block: int, ph: Phases) -> str:
    for name in ("categorisation", "recall", "formatting"):
        r = getattr(ph, name)
        if r is not None and r[0] <= block <= r[1]:
            return name
    return "-"


def disturbance(drop: list[float], kl: list[float], ph: Phases, top: int = 3) -> list[dict]:
    """Blocks ranked by how much compressing only that block lowers the answer's final
    log-probability (mean over prompts; ties broken by KL), with the teacher's phase."""
    order = sorted(range(len(drop)), key=lambda i: (-drop[i], -kl[i]))
    return [{"block": i, "logprob_drop": drop[i], "kl": kl[i], "phase": phase_of(i, ph)} for i in order[:top]]
