"""Text -> token stream -> fixed-length windows.

A corpus (see dfplan.corpus) is tokenized into one flat stream, files joined by the
tokenizer's end-of-text id. The stream is cached on disk under a key that hashes the
bytes of every input file and the tokenizer, so a rerun with the same inputs is instant
and any change to either re-tokenizes.

Windows are views into the stream given by their start offsets: a training window of
length L holds L + 1 tokens (inputs and shifted targets), consecutive windows share one
token. The train/valid split assigns contiguous blocks of windows, never interleaved
tokens, so validation text is text the model has not seen a neighbour of mid-sentence.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from .corpus import CorpusFiles, read_texts, resolve_corpus
from .errors import DfplanError
from .fileio import atomic_path, sha256_file
from .tokenizer import eos_id, fingerprint, vocab_size_of

_CACHE_FORMAT = 1
# Long files are encoded in pieces of about this many characters, cut at a newline, so
# encode_batch can spread one big file over the cores and memory stays bounded.
_PIECE_CHARS = 1 << 20


def cache_root() -> Path:
    """Where token caches live: $DFPLAN_CACHE_DIR, else $XDG_CACHE_HOME/dfplan, else ~/.cache/dfplan."""
    if os.environ.get("DFPLAN_CACHE_DIR"):
        return Path(os.environ["DFPLAN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dfplan"


@dataclass(frozen=True)
class TokenStream:
    tokens: np.ndarray          # (T,) uint16 when the vocab fits, else int32
    files: tuple[str, ...]
    key: str                    # sha256 of inputs + tokenizer; names the cache file
    vocab_size: int
    cached: bool                # True when this call read the cache instead of tokenizing

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def stream_key(files: Sequence[Path], tok: Tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": _CACHE_FORMAT, "tokenizer": fingerprint(tok)}).encode())
    for f in files:
        try:
            h.update(sha256_file(f).encode())
        except OSError as e:
            raise DfplanError(f"cannot read corpus file {f}: {e.strerror or e}") from None
    return h.hexdigest()


def _pieces(text: str) -> list[str]:
    if len(text) <= _PIECE_CHARS:
        return [text]
    out, start = [], 0
    while start < len(text):
        end = min(start + _PIECE_CHARS, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        out.append(text[start:end])
        start = end
    return out


def encode_files(files: Sequence[Path], tok: Tokenizer) -> np.ndarray:
    """Tokenize files into one stream, an end-of-text id after each non-empty file."""
    n_vocab = vocab_size_of(tok)
    dtype = np.uint16 if n_vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    eos = eos_id(tok)
    parts: list[np.ndarray] = []
    for _, text in read_texts(files):
        ids = [np.asarray(e.ids, dtype=dtype) for e in tok.encode_batch(_pieces(text))]
        ids = [a for a in ids if a.size]
        if not ids:
            continue
        parts.extend(ids)
        if eos is not None:
            parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def load_tokens(corpus: str | Sequence[str] | CorpusFiles, tok: Tokenizer, glob: str = "*.txt",
                cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> TokenStream:
    """Resolve, tokenize (or read from cache) and return the corpus as one token stream."""
    cf = corpus if isinstance(corpus, CorpusFiles) else resolve_corpus(corpus, glob)
    key = stream_key(cf.files, tok)
    path = Path(cache_dir or cache_root()) / "tokens" / f"{key}.npy"
    names = tuple(str(f) for f in cf.files)
    if use_cache and path.is_file():
        try:
            arr = np.load(path)
            return TokenStream(arr, names, key, vocab_size_of(tok), cached=True)
        except (OSError, ValueError):
            pass  # a corrupt cache file is rebuilt below
    arr = encode_files(cf.files, tok)
    if arr.size == 0:
        raise DfplanError(f"corpus {', '.join(cf.specs)} is empty (0 tokens in {len(names)} "
                          "file(s)); pass files that contain text")
    if use_cache:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr)
    return TokenStream(arr, names, key, vocab_size_of(tok), cached=False)


def require_tokens(n_tokens: int, needed: int, what: str) -> None:
    if n_tokens < needed:
        raise DfplanError(f"corpus has {n_tokens} tokens but {what} needs at least {needed}; "
                          "pass a longer corpus or a shorter --seq-len")

# Share of window blocks held out from calibration: sensitivity, its validation and the
# planner's measured objective all use this one split.
VALID_FRACTION = 0.1


@dataclass(frozen=True)
class WindowSplit:
    """Start offsets of train and valid windows; each window spans seq_len + 1 tokens."""
    seq_len: int
    train: np.ndarray           # (Nt,) int64 start offsets
    valid: np.ndarray           # (Nv,) int64 start offsets


def window_starts(n_tokens: int, seq_len: int) -> np.ndarray:
    """Non-overlapping windows covering the stream: start k*seq_len, length seq_len + 1."""
    n = max(0, (n_tokens - 1) // seq_len)
    return np.arange(n, dtype=np.int64) * seq_len


def split_windows(n_tokens: int, seq_len: int, valid_fraction: float = 0.05, seed: int = 0,
                  block_windows: int = 16) -> WindowSplit:
    """Seeded train/valid split of the stream's windows by contiguous blocks.

    Blocks hold up to `block_windows` consecutive windows; at least one block goes to
    each side. Needs at least two windows (2 * seq_len + 1 tokens).
    """
    if not 0.0 < valid_fraction < 1.0:
        raise DfplanError(f"valid fraction must be in (0, 1), got {valid_fraction}")
    require_tokens(n_tokens, 2 * seq_len + 1, f"a train/valid split at seq-len {seq_len}")
    starts = window_starts(n_tokens, seq_len)
    n_win = len(starts)
    # small corpora get smaller blocks so there are still enough of them to split
    bw = max(1, min(block_windows, n_win // 20))
    block_of = np.arange(n_win) // bw
    n_blocks = int(block_of[-1]) + 1
    n_valid = min(n_blocks - 1, max(1, round(valid_fraction * n_blocks)))
    rng = np.random.default_rng(seed)
    valid_blocks = rng.choice(n_blocks, size=n_valid, replace=False)
    is_valid = np.isin(block_of, valid_blocks)
    return WindowSplit(seq_len, starts[~is_valid], starts[is_valid])


def evenly_spaced(starts: np.ndarray, n: int) -> np.ndarray:
    """At most n of `starts`, evenly spaced (first and last kept): a deterministic subset."""
    if len(starts) <= n:
        return starts
    return starts[np.linspace(0, len(starts) - 1, n).round().astype(np.int64)]


def gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Windows tokens[s : s + length] for every start -> (N, length) int64."""
    idx = np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)
    return tokens[idx].astype(np.int64)


def heldout_windows(tokens: np.ndarray, seq_len: int, n_max: int | None = None, seed: int = 0,
                    valid_fraction: float = VALID_FRACTION) -> np.ndarray:
    """Up to n_max windows of the seeded valid split, evenly spaced -> (n, seq_len + 1).

    The split is the one calibration samples its train windows from (same fraction and seed),
    so scores are never validated on the text they were computed from. n_max None/0: all.
    """
    split = split_windows(len(tokens), seq_len, valid_fraction, seed)
    starts = evenly_spaced(split.valid, n_max) if n_max else split.valid
    return gather(tokens, starts, seq_len + 1)


def stream_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping (N, seq_len + 1) windows over a whole held-out stream, evenly spaced when
    capped, so the same corpus always gives the same windows."""
    require_tokens(len(tokens), seq_len + 1, f"one evaluation window of {seq_len} tokens")
    starts = window_starts(len(tokens), seq_len)
    if max_windows is not None:
        starts = evenly_spaced(starts, max_windows)
    return gather(tokens, starts, seq_len + 1)


def sample_windows(tokens: np.ndarray, n: int, length: int, seed: int = 0) -> np.ndarray:
    """Calibration data: `n` windows of `length` tokens at seeded random offsets -> (n, length) int64."""
    if n <= 0:
        raise DfplanError(f"number of calibration windows must be positive, got {n}")
    require_tokens(len(tokens), length, f"a window of {length} tokens")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - length + 1, size=n)
    return gather(tokens, starts, length)


class EpochSampler:
    """Batches of window indices, a fresh seeded permutation each epoch.

    The position (epoch, offset) is the whole state, so a resumed run continues with
    exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"need n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def next_indices(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            take = min(need, self.n - self.offset)
            out.append(self._perm[self.offset:self.offset + take])
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"n": self.n, "batch_size": self.batch_size, "seed": self.seed,
                "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, d: dict) -> None:
        if d["n"] != self.n or d["seed"] != self.seed:
            raise DfplanError("checkpoint was written for a different corpus split or seed; "
                              "resume with the same --corpus, --seq-len and --seed")
        self.epoch, self.offset = int(d["epoch"]), int(d["offset"])
        self._perm = self._permutation(self.epoch)


def unigram_ppl(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    """Perplexity of a add-one smoothed unigram model fit on train, scored on valid.

    The floor any language model has to beat: it knows token frequencies, nothing else.
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(np.exp(-logp[np.asarray(valid_tokens, dtype=np.int64)].mean()))
