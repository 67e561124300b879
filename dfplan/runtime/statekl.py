"""Quality cost of a low-precision SSM state: KL of a long generation against the fp32 state.

The fp32-state model generates greedily; the same token sequence is then fed (teacher
forced) through a model whose state is kept in bf16 / fp16, and the per-position
KL(p_fp32 || p_low) of the next-token distributions is averaged. Feeding the same tokens
keeps the comparison about the state's precision, not about where two generations diverge.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .decode import prefill, state_dtype_of


@torch.no_grad()
def _logits_along(model, prompt: torch.Tensor, tokens: torch.Tensor, state_dtype, bar=None) -> torch.Tensor:
    """(1, L) prompt, (n,) continuation -> (n, V) next-token logits before each of them."""
    cache = model.new_cache(1, state_dtype=state_dtype)
    logits, cache = prefill(model, prompt, cache)
    out = [logits.float()]
    for t in tokens[:-1]:
        out.append(model.step(t.view(1), cache).float())
        if bar is not None:
            bar.update(1)
    return torch.cat(out)[:, :model.config.vocab_size]


@torch.no_grad()
def state_dtypes_kl(model, prompt: torch.Tensor, n_tokens: int, state_dtypes=("bf16", "fp16"),
                    progress: bool = False) -> dict:
    """One fp32-state greedy generation of n_tokens after `prompt` (1, L), then each state dtype
    teacher-forced along it -> {dtype name: {"state_dtype", "tokens", "kl_mean", "kl_max",
    "top1_agree"}}. A non-finite KL (fp16 overflow) is reported as inf."""
    total = n_tokens * (1 + len(state_dtypes))
    with tqdm(total=total, desc="state KL", unit="tok", disable=not progress, leave=False) as bar:
        ref_tokens, ref_logits = [], []
        cache = model.new_cache(1)
        logits, cache = prefill(model, prompt, cache)
        for i in range(n_tokens):
            ref_logits.append(logits.float())
            nxt = logits.argmax(-1)
            ref_tokens.append(nxt)
            if i + 1 < n_tokens:                   # the last token's successor is not compared
                logits = model.step(nxt, cache)
            bar.update(1)
        toks = torch.cat(ref_tokens)
        # the generation's own logits are the fp32 teacher-forced ones (same ops, same tokens)
        p = F.log_softmax(torch.cat(ref_logits)[:, :model.config.vocab_size], -1)
        out = {}
        for name in state_dtypes:
            q = F.log_softmax(_logits_along(model, prompt, toks, state_dtype_of(name), bar), -1)
            bar.update(1)
            kl = (p.exp() * (p - q)).sum(-1).clamp(min=0)                    # (n,)
            kl = torch.where(torch.isfinite(kl), kl, torch.full_like(kl, float("inf")))
            out[str(name)] = {"state_dtype": str(name), "tokens": int(n_tokens), "kl_mean": float(kl.mean()),
                              "kl_max": float(kl.max()),
                              "top1_agree": float((p.argmax(-1) == q.argmax(-1)).float().mean())}
    return out


def state_dtype_kl(model, prompt: torch.Tensor, n_tokens: int, state_dtype="bf16") -> dict:
    """-> {"state_dtype", "tokens", "kl_mean", "kl_max", "top1_agree"} over n_tokens positions."""
    return state_dtypes_kl(model, prompt, n_tokens, (state_dtype,))[str(state_dtype)]
