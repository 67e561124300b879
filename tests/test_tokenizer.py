"""Tokenizer loading, BPE training, save/load and the vocab check (all offline)."""
import json
import random

import pytest

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.tokenizer import (
    EOS,
    check_vocab,
    eos_id,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
    vocab_size_of,
)


def _texts(seed=0, n=200):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "state", "space", "model", "mamba", "scan", "héllo"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) + "\n" for _ in range(n)]


def test_train_bpe_roundtrip_and_size():
    texts = _texts()
    tok = train_bpe(texts, vocab_size=320)
    assert 258 <= vocab_size_of(tok) <= 320
    assert eos_id(tok) == 0 and tok.id_to_token(0) == EOS
    # byte-level: any text, including unseen characters, round-trips without <unk>
    for s in [texts[3], "zebra ∑ 数 \t\n end"]:
        assert tok.decode(tok.encode(s).ids) == s
    # merges were learned: frequent words compress below one token per byte
    assert len(tok.encode(texts[0]).ids) < len(texts[0].encode())


def test_train_bpe_is_deterministic():
    a, b = train_bpe(_texts(1), 300), train_bpe(_texts(1), 300)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(train_bpe(_texts(2), 300))


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(DfplanError, match="too small"):
        train_bpe(_texts(), 100)


def test_save_load_from_file_and_dir(tmp_path):
    tok = train_bpe(_texts(), 300)
    path = save_tokenizer(tok, tmp_path / "model")
    assert path.name == "tokenizer.json" and json.loads(path.read_text())["model"]["type"] == "BPE"
    for spec in (path, tmp_path / "model", str(path)):
        again = load_tokenizer(spec)
        assert again.encode("gamma delta").ids == tok.encode("gamma delta").ids
    assert not list((tmp_path / "model").glob("*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(DfplanError, match="does not exist"):
        load_tokenizer(tmp_path / "nope" / "tok.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfplanError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DfplanError, match="cannot load tokenizer"):
        load_tokenizer(bad)


def test_hub_path_is_used_for_repo_ids(monkeypatch):
    # no network in tests: intercept the download and check what would be fetched
    from tokenizers import Tokenizer
    seen = []

    def fake(repo_id, *a, **k):
        seen.append(repo_id)
        raise RuntimeError("offline")

    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(fake))
    with pytest.raises(DfplanError, match="cannot be downloaded"):
        load_tokenizer("state-spaces/mamba2-130m")
    assert seen == ["EleutherAI/gpt-neox-20b"]


def test_check_vocab():
    tok = train_bpe(_texts(), 300)
    n = vocab_size_of(tok)
    cfg = Mamba2Config.preset("tiny")
    check_vocab(tok, cfg.replace(vocab_size=n))          # exact fit is fine
    with pytest.raises(DfplanError, match=f"tokenizer has {n} tokens"):
        check_vocab(tok, cfg.replace(vocab_size=n - 1))
