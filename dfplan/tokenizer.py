"""Tokenizers: load a tokenizer.json (file, model folder or hub id), train a byte-level BPE
for the small built-in teachers, save it beside a model, and check it fits the model's vocab.

The `tokenizers` library object is used directly (no wrapper class): `encode_batch`,
`decode`, `get_vocab_size` and `token_to_id` are all callers need.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DfplanError
from .fileio import atomic_path

TOKENIZER_FILE = "tokenizer.json"
EOS = "<|endoftext|>"
# state-spaces checkpoints ship no tokenizer; they were trained with GPT-NeoX-20B's.
_HUB_TOKENIZER_OF = {"state-spaces/": "EleutherAI/gpt-neox-20b"}


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load from a tokenizer.json file, a folder holding one, or a Hugging Face hub id."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
        if not path.is_file():
            raise DfplanError(f"no {TOKENIZER_FILE} in {Path(spec)}; pass --tokenizer with a "
                              "tokenizer.json file or a hub id")
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises bare Exceptions for malformed JSON
            raise DfplanError(f"cannot load tokenizer {path}: {str(e).splitlines()[0]}") from None
    text = str(spec)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith(".json"):
        return _load_from_hub(text)
    raise DfplanError(f"tokenizer {text} does not exist; pass a tokenizer.json file, "
                      "a folder containing one, or a hub id such as EleutherAI/gpt-neox-20b")


def _load_from_hub(repo_id: str) -> Tokenizer:
    for prefix, repl in _HUB_TOKENIZER_OF.items():
        if repo_id.startswith(prefix):
            repo_id = repl
    try:
        return Tokenizer.from_pretrained(repo_id)
    except Exception as e:
        raise DfplanError(f"tokenizer {repo_id!r} is not a local path and cannot be downloaded "
                          f"from the hub ({str(e).splitlines()[0][:120]}); pass a local tokenizer.json "
                          "(e.g. ../shared/data/tokenizers/gpt-neox-20b/20B_tokenizer.json)") from None


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Byte-level BPE with `vocab_size` ids in total (the 256 bytes, EOS, then merges).

    Byte-level means any text encodes without <unk>, so the teacher never sees an
    out-of-vocabulary symbol on a new corpus.
    """
    if vocab_size < 258:
        raise DfplanError(f"vocab_size {vocab_size} is too small for a byte-level BPE (need >= 258)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, model_dir: str | os.PathLike) -> Path:
    """Write `model_dir/tokenizer.json` atomically; returns its path."""
    path = Path(model_dir) / TOKENIZER_FILE
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return path


def vocab_size_of(tok: Tokenizer) -> int:
    return tok.get_vocab_size(with_added_tokens=True)


def eos_id(tok: Tokenizer) -> int | None:
    """Id of the end-of-text token, or None if the tokenizer has none."""
    for name in (EOS, "</s>", "<eos>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def fingerprint(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON: identical tokenizers hash identically."""
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def check_vocab(tok: Tokenizer, cfg) -> None:
    """Raise DfplanError if the tokenizer emits ids the model has no embedding row for."""
    n = vocab_size_of(tok)
    if n > cfg.vocab_size:
        raise DfplanError(f"tokenizer has {n} tokens but the model's vocab_size is {cfg.vocab_size}; "
                          "use the tokenizer the model was trained with")
