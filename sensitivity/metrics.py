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
    def add(self, t_logits: torch.Tensor, s_logits: torch.Tensor, targets: torch.Tensor,
            t_logp: torch.Tensor | None = None) -> None:
        """t_logits, s_logits (b, L, V) float32 (real vocab); targets (b, L) int64."""
        t = t_logits.flatten(0, -2)                                   # (N, V)
        s = s_logits.flatten(0, -2).float()
        lt = F.log_softmax(t, -1) if t_logp is None else t_logp.flatten(0, -2)
        ls = F.log_softmax(s, -1)
        diff = lt - ls                                                # (N, V)
        self.kl += float((lt.exp() * diff).sum(-1).sum(dtype=torch.float64))
        self.rkl -= float((ls.exp() * diff).sum(-1).sum(dtype=torch.float64))
        tg = targets.reshape(-1, 1)
        self.ce_s -= float(ls.gather(-1, tg).sum(dtype=torch.float64))
        self.ce_t -= float(lt.gather(-1, tg).sum(dtype=torch.float64))
        self.sq_err += float((s - t).square().sum(-1).sum(dtype=torch.float64))
        self.cos += float(F.cosine_similarity(s, t, dim=-1).sum(dtype=torch.float64))
        self.n_tokens += t.shape[0]
        self.n_logits += t.numel()

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
