"""Held-out quality of a model (FP teacher, compressed student or loaded packed artifact).

The same functions score every model, so a number in a report is the number of the
artifact that was measured: perplexity from mean next-token NLL, and the mean
KL(teacher || model) over the same windows.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import load_tokens, stream_windows
from .errors import DfplanError
from .fileio import write_json_atomic
from .loading import load_any
from .tokenizer import check_vocab, load_tokenizer


@dataclass(frozen=True)
class PplResult:
    ppl: float
    nll: float               # mean next-token NLL, nats
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(windows, batch_size: int):
    w = torch.as_tensor(np.asarray(windows), dtype=torch.long)
    if w.dim() != 2 or w.shape[1] < 2:
        raise DfplanError(f"evaluation windows must be (N, L>=2) token ids, got shape {tuple(w.shape)}")
    for i in range(0, w.shape[0], batch_size):
        yield w[i:i + batch_size]


@torch.no_grad()
def perplexity(model, windows, batch_size: int = 8, vocab_size: int | None = None,
               progress: bool = False) -> PplResult:
    """windows (N, L+1): predict tokens 1..L from 0..L-1. Padded vocab rows are excluded
    from the softmax when vocab_size is given (they are never real tokens)."""
    model.eval()
    total, count, n_win = 0.0, 0, 0
    it = _batches(windows, batch_size)
    for batch in tqdm(it, disable=not progress, desc="ppl", unit="batch"):
        logits = model(batch[:, :-1]).float()                 # (b, L, Vp)
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
        n_win += batch.shape[0]
    nll = total / count
    return PplResult(ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=n_win)


@torch.no_grad()
def kl_to_teacher(teacher, student, windows, batch_size: int = 8, vocab_size: int | None = None) -> float:
    """Mean over tokens of KL(teacher || student) on next-token distributions, nats."""
    total, count = 0.0, 0
    for batch in _batches(windows, batch_size):
        x = batch[:, :-1]
        t, s = teacher(x).float(), student(x).float()
        if vocab_size is not None:
            t, s = t[..., :vocab_size], s[..., :vocab_size]
        lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
        total += (lt.exp() * (lt - ls)).sum().item()
        count += x.numel()
    return total / count


def evaluate_model(model_arg: str, corpus, tokenizer: str | None = None, teacher: str | None = None,
                   seq_len: int = 256, max_windows: int | None = 64, batch_size: int = 8,
                   out: str | None = None) -> dict:
    """Load a model (checkpoint or packed artifact), score it on held-out text, optionally
    against a teacher; returns (and optionally writes) a JSON-able dict."""
    t0 = time.perf_counter()
    model, tok = load_any(model_arg)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    if tok is None:
        raise DfplanError(f"{model_arg} has no tokenizer.json; pass --tokenizer")
    check_vocab(tok, model.config)
    stream = load_tokens(corpus, tok)
    windows = stream_windows(stream.tokens, seq_len, max_windows)
    V = model.config.vocab_size
    res = perplexity(model, windows, batch_size, vocab_size=V, progress=True)
    result = {"model": model_arg, "corpus": list(stream.files), "seq_len": seq_len,
              **res.to_dict()}
    if teacher is not None:
        tmodel, _ = load_any(teacher)
        if tmodel.config.vocab_padded != model.config.vocab_padded:
            raise DfplanError(f"teacher {teacher} has vocab {tmodel.config.vocab_padded}, "
                              f"model has {model.config.vocab_padded}; they cannot be compared")
        result["teacher_ppl"] = perplexity(tmodel, windows, batch_size, vocab_size=V).ppl
        result["kl_to_teacher"] = kl_to_teacher(tmodel, model, windows, batch_size, vocab_size=V)
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    if out:
        write_json_atomic(out, result)
    return result
