"""The DF-SSM distillation loss: softened KL to the teacher plus next-token cross-entropy.

loss = kl_weight * KL(softmax(t / T) || softmax(s / T)) * T^2 + ce_weight * CE(s, next tokens)

T^2 keeps the KL term's gradient on the same scale as the CE term's when T changes
(Hinton et al.). The cross-entropy is against the corpus' next tokens; the teacher enters
through the KL term. Padded vocabulary rows (ids >= vocab_size) are never real tokens and
are cut from both softmaxes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DfplanError


@dataclass(frozen=True)
class LossConfig:
    kl_weight: float = 0.7
    ce_weight: float = 0.3
    temperature: float = 2.0

    def __post_init__(self):
        if self.kl_weight < 0 or self.ce_weight < 0 or self.kl_weight + self.ce_weight <= 0:
            raise DfplanError(f"loss weights must be >= 0 and not both 0, got kl={self.kl_weight}, "
                              f"ce={self.ce_weight}")
        if not self.temperature > 0:
            raise DfplanError(f"distillation temperature must be > 0, got {self.temperature}")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 cfg: LossConfig = LossConfig(), vocab_size: int | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """student/teacher logits (B, L, Vp), targets (B, L) -> (scalar loss, {"kl", "ce"} detached).

    "kl" is the KL at temperature T (before the T^2 factor), averaged over tokens.
    """
    s = student_logits.float()
    t = teacher_logits.float()
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    s, t = s.flatten(0, -2), t.flatten(0, -2)                       # (N, V)
    T = cfg.temperature
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(s, targets.reshape(-1))
    loss = cfg.kl_weight * kl * (T * T) + cfg.ce_weight * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}
