r"""Perplexity by the standard protocol: one long text, sliding windows with a stride.

The text is the whole test split joined the usual way (WikiText-2 raw rows with "\n\n",
as GPTQ/SparseGPT and lm-eval's wikitext do; PTB sentences with " "). The token stream
gets the end-of-text token in front, so every token of the text is predicted once:
the first window predicts its first `max_length` tokens, each later window predicts the
next `stride` tokens while seeing the `max_length - stride` tokens before them.

Word- and byte-level figures follow lm-eval's wikitext task: the summed NLL (nats) over
the text divided by len(re.split(r"\s+", text)) words or by its UTF-8 byte count;
bits_per_byte = NLL / bytes / ln 2. They are tokenizer-independent, token perplexity is not.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import DfplanError


@dataclass(frozen=True)
class TextPpl:
    token_perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float
    nll_sum: float           # nats, over every scored token
    n_tokens: int            # scored tokens (= tokens of the text)
    n_words: int
    n_bytes: int
    n_windows: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def count_words(text: str) -> int:
    """lm-eval's word count for rolling-loglikelihood tasks."""
    return len(re.split(r"\s+", text))


def read_wikitext_rows(path: str | Path, limit: int | None = None) -> list[str]:
    """test.rows.jsonl: one JSON string per dataset row (empty rows are "")."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DfplanError(f"{path}:{n}: not JSON ({e.msg}); expected one JSON string per line") from None
            if not isinstance(row, str):
                raise DfplanError(f"{path}:{n}: expected a JSON string (one WikiText row), "
                                  f"got {type(row).__name__}")
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


def read_ptb_lines(path: str | Path, limit: int | None = None) -> list[str]:
    """Mikolov PTB text: one sentence a line, surrounded by spaces."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.lstrip().startswith(("{", "[", '"')):
                raise DfplanError(f"{path}:{n}: looks like JSON; expected plain PTB text, one sentence a line")
            out.append(line.strip())
            if limit is not None and len(out) >= limit:
                break
    return out


def standard_text(kind: str, path: str | Path, limit: int | None = None) -> str:
    """The evaluation text of a perplexity set; limit keeps its first rows/lines."""
    if kind == "wikitext":
        return "\n\n".join(read_wikitext_rows(path, limit))
    if kind == "ptb":
        return " ".join(read_ptb_lines(path, limit))
    raise ValueError(kind)


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of 1 + n_tokens ids (prefix first): (start, end, n_scored).

    Input ids are stream[start:end]; they predict stream[start+1:end+1], of which the
    last n_scored are counted. Each target is counted exactly once.
    """
    if not 1 <= stride <= max_length:
        raise DfplanError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    out, done = [], 0                        # targets are stream positions 1..n_tokens
    while done < n_tokens:
        take = min(max_length if done == 0 else stride, n_tokens - done)
        last = done + take                    # last target position (inclusive)
        start = max(0, last - max_length)
        out.append((start, last, take))
        done = last
    return out


@torch.no_grad()
def text_perplexity(model, token_ids: list[int], prefix_id: int, max_length: int, stride: int,
                    n_words: int, n_bytes: int, batch_size: int = 8, vocab_size: int | None = None,
                    progress: bool = False) -> TextPpl:
    """Sliding-window NLL of `token_ids` under `model` (ids (b, L) -> logits (b, L, V'))."""
    if not token_ids:
        raise DfplanError("the evaluation text encodes to no tokens")
    stream = torch.tensor([prefix_id] + list(token_ids), dtype=torch.long)
    wins = windows(len(token_ids), max_length, stride)
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else next(iter(model.buffers()), torch.empty(0)).device
    total = 0.0
    # windows of equal length batch together; all but possibly the first are max_length long
    groups: dict[int, list] = {}
    for w in wins:
        groups.setdefault(w[1] - w[0], []).append(w)
    bar = tqdm(total=len(wins), disable=not progress, desc="ppl windows", unit="win")
    for length, ws in groups.items():
        for i in range(0, len(ws), batch_size):
            chunk = ws[i:i + batch_size]
            ids = torch.stack([stream[s:e] for s, e, _ in chunk]).to(dev)          # (b, L)
            tgt = torch.stack([stream[s + 1:e + 1] for s, e, _ in chunk]).to(dev)  # (b, L)
            logits = model(ids).float()                                             # (b, L, V')
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            nll = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape)
            for row, (_, _, k) in zip(nll, chunk):
                total += row[length - k:].double().sum().item()
            bar.update(len(chunk))
    bar.close()
    n = len(token_ids)
    return TextPpl(token_perplexity=math.exp(total / n), word_perplexity=math.exp(total / n_words),
                   byte_perplexity=math.exp(total / n_bytes), bits_per_byte=total / n_bytes / math.log(2),
                   nll_sum=total, n_tokens=n, n_words=n_words, n_bytes=n_bytes, n_windows=len(wins),
                   max_length=max_length, stride=stride)
