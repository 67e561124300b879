"""Quality cost of a low-precision SSM state: KL of a long generation against the fp32 state.

The fp32-state model generates greedily; the same token sequence is then fed (teacher
forced) through a model whose state is kept in bf16 / fp16, and the per-position
KL(p_fp32 || p_low) of the next-token distributions is averaged. Feeding the same tokens
keeps the comparison about the state's precision, not about where two generations diverge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .decode import prefill, state_dtype_of


@torch.no_grad()
def _logits_along(model, prompt: torch.Tensor, tokens: torch.Tensor, state_dtype) -> torch.Tensor:
    """(1, L) prompt, (n,) continuation -> (n, V) next-token logits before each of them."""
    cache = model.new_cache(1, state_dtype=state_dtype)
    logits, cache = prefill(model, prompt, cache)
    out = [logits.float()]
    for t in tokens[:-1]:
        out.append(model.step(t.view(1), cache).float())
    return torch.cat(out)[:, :model.config.vocab_size]


@torch.no_grad()
def state_dtype_kl(model, prompt: torch.Tensor, n_tokens: int, state_dtype="bf16") -> dict:
    """-> {"state_dtype", "tokens", "kl_mean", "kl_max", "top1_agree"} over n_tokens positions."""
    sd = state_dtype_of(state_dtype)
    ref_tokens = []
    cache = model.new_cache(1)
    logits, cache = prefill(model, prompt, cache)
    for _ in range(n_tokens):
        nxt = logits.argmax(-1)
        ref_tokens.append(nxt)
        logits = model.step(nxt, cache)
    toks = torch.cat(ref_tokens)
    p = F.log_softmax(_logits_along(model, prompt, toks, torch.float32), -1)
    q = F.log_softmax(_logits_along(model, prompt, toks, sd), -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)                    # (n,)
    return {"state_dtype": str(state_dtype), "tokens": int(n_tokens), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "top1_agree": float((p.argmax(-1) == q.argmax(-1)).float().mean())}
