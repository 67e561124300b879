"""Next-token choice on tensors: greedy, temperature, top-k, top-p (nucleus), seeded.

Everything stays a tensor op on the logits' device (no .item(), no Python loops over the
vocabulary), so it runs inside the decode loop and inside a CUDA graph's neighbourhood
without synchronising.
"""
from __future__ import annotations

import torch

from ..prompting import Sampling  # noqa: F401  (defined without torch, for dfplan.lite too)


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """(B, V) logits -> (B, V) float32 scaled by 1/temperature, filtered entries -inf."""
    x = logits.float() / s.temperature
    V = x.shape[-1]
    if s.top_k and s.top_k < V:
        kth = torch.topk(x, s.top_k, dim=-1).values[..., -1:]          # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens before it already hold top_p of the mass (the first
        # token is always kept, so at least one survives)
        drop_sorted = (probs.cumsum(-1) - probs) >= s.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) -> (B,) int64 next tokens."""
    if s.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(filter_logits(logits, s), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
