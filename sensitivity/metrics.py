"""How far a compressed model's next-token distribution moved from the teacher's.

Accumulators hold float64 sums over calibration micro-batches so the final means do not
depend on how the tokens were batched. Logits arrive already cut to the real vocabulary
(padded rows are never real tokens and would dilute MSE and cosine).

Per token, with t / s the teacher / compressed logits and p_t, p_s their softmaxes:
  kl   = KL(p_t || p_s) = sum p_t (log p_t - log p_s)       (primary score, nats)
  rkl  = KL(p_s || p_t)
  dce  = CE(s, target) - CE(t, target)                        (nats)
  mse  = mean over vocab of (s - t)^2                         (raw logits)
  cos  = cosine(s, t)
and of the compressed unit itself
  sqnr = 10 log10(sum y^2 / sum (y_hat - y)^2) over its outputs on the calibration tokens (dB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

METRICS = ("kl", "rkl", "dce", "mse", "cos", "sqnr")
# +1: a larger value means more damage; -1: a larger value means less (cosine, SQNR)
DAMAGE_SIGN = {"kl": 1, "rkl": 1, "dce": 1, "mse": 1, "cos": -1, "sqnr": -1}


def damage(metric: str, values):
    """Orient a metric so that larger always means more damage (for ranking)."""
    return values * DAMAGE_SIGN[metric]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, V), (N, V) -> (N,) row-wise dot products; bmm is ~3x faster than (a * b).sum(-1) on CPU."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


class TeacherTerms:
    """The teacher's side of every metric for one micro-batch, computed once for all candidates."""

    def __init__(self, t_logits: torch.Tensor):
        self.t = t_logits.flatten(0, -2).float()                      # (N, V)
        self.lt = F.log_softmax(self.t, -1)
        self.pt = self.lt.exp()
        self.norm = torch.linalg.vector_norm(self.t, dim=-1)           # (N,)


@dataclass
class LogitSums:
    """Running sums of the logit metrics of one candidate."""
    kl: float = 0.0
    rkl: float = 0.0
    ce_s: float = 0.0
    ce_t: float = 0.0
    sq_err: float = 0.0
    cos: float = 0.0
    n_tokens: int = 0
    n_logits: int = 0

    @torch.no_grad()
    def add(self, teacher: torch.Tensor | TeacherTerms, s_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """teacher: (b, L, V) float32 logits (real vocab) or their TeacherTerms; s_logits (b, L, V);
        targets (b, L) int64."""
        T = teacher if isinstance(teacher, TeacherTerms) else TeacherTerms(teacher)
        s = s_logits.flatten(0, -2).float()                          # (N, V)
        ls = F.log_softmax(s, -1)
        diff = T.lt - ls                                              # exact zeros when s == t
        self.kl += float(_rowdot(T.pt, diff).sum(dtype=torch.float64))
        self.rkl -= float(_rowdot(ls.exp(), diff).sum(dtype=torch.float64))
        tg = targets.reshape(-1, 1)
        self.ce_s -= float(ls.gather(-1, tg).sum(dtype=torch.float64))
        self.ce_t -= float(T.lt.gather(-1, tg).sum(dtype=torch.float64))
        del diff, ls
        err = s - T.t
        self.sq_err += float(_rowdot(err, err).sum(dtype=torch.float64))
        del err
        denom = (torch.linalg.vector_norm(s, dim=-1) * T.norm).clamp(min=1e-30)
        self.cos += float((_rowdot(s, T.t) / denom).sum(dtype=torch.float64))
        self.n_tokens += s.shape[0]
        self.n_logits += s.numel()

    def result(self) -> dict:
        n = max(self.n_tokens, 1)
        return {"kl": self.kl / n, "rkl": self.rkl / n, "dce": (self.ce_s - self.ce_t) / n,
                "mse": self.sq_err / max(self.n_logits, 1), "cos": self.cos / n}


@dataclass
class SqnrSums:
    """Signal and noise energy of one module's output against its reference output."""
    signal: float = 0.0
    noise: float = 0.0

    @torch.no_grad()
    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        r = ref.float()
        self.signal += float(r.square().sum(dtype=torch.float64))
        self.noise += float((approx.float() - r).square().sum(dtype=torch.float64))

    @property
    def db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)
