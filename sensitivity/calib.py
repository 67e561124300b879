"""Calibration and held-out windows from one corpus, disjoint by construction.

The token stream is split into train/valid blocks of windows (dfplan.data.split_windows,
seeded). Calibration windows are a seeded sample of the train windows; validation scores
on the valid windows, so `sensitivity validate` never measures perplexity on text the
scores were computed from.
"""
from __future__ import annotations

import numpy as np

from dfplan.data import VALID_FRACTION, gather, load_tokens, split_windows
from dfplan.errors import DfplanError
from dfplan.tokenizer import check_vocab


def calibration_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0,
                        valid_fraction: float = VALID_FRACTION) -> np.ndarray:
    """n distinct train windows of seq_len + 1 tokens (inputs + shifted targets) -> (n, seq_len + 1)."""
    if n < 1:
        raise DfplanError(f"--windows must be at least 1, got {n}")
    if seq_len < 1:
        raise DfplanError(f"--seq-len must be at least 1, got {seq_len}")
    split = split_windows(len(tokens), seq_len, valid_fraction, seed)
    if len(split.train) < n:
        raise DfplanError(f"calibration text is too short: {len(tokens)} tokens give {len(split.train)} "
                          f"calibration windows of {seq_len} tokens (after holding out {valid_fraction:.0%}), "
                          f"fewer than the {n} requested; pass a longer corpus, fewer --windows or a shorter --seq-len")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(split.train, size=n, replace=False))
    return gather(tokens, starts, seq_len + 1)


def corpus_tokens(corpus, tok, cfg):
    """Tokenize (cached) and check the ids fit the model -> TokenStream."""
    check_vocab(tok, cfg)
    return load_tokens(list(corpus) if not isinstance(corpus, str) else corpus, tok)
