"""Corpus resolution, cached tokenization, window splits and calibration sampling."""
import numpy as np
import pytest

from dfplan.corpus import BUILTIN, BUILTIN_HELDOUT, builtin_files, resolve_corpus
from dfplan.data import EpochSampler, gather, load_tokens, sample_windows, split_windows, unigram_ppl, window_starts
from dfplan.errors import DfplanError
from dfplan.tokenizer import eos_id, train_bpe


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    words = np.array(["one", "two", "three", "four", "five", "six", "seven", "eight"])
    return train_bpe([" ".join(rng.choice(words, 40)) for _ in range(100)], 300)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_resolve_file_folder_glob(tmp_path):
    a = _write(tmp_path / "a.txt", "one two")
    b = _write(tmp_path / "sub" / "deep" / "b.txt", "three")
    _write(tmp_path / "sub" / "c.md", "ignored by default glob")
    assert resolve_corpus(str(a)).files == (a,)
    assert resolve_corpus(str(tmp_path)).files == (a, b)
    assert len(resolve_corpus(str(tmp_path), glob="*.md").files) == 1
    assert resolve_corpus(str(tmp_path / "**" / "*.txt")).files == (a, b)
    # a file named twice counts once
    assert resolve_corpus([str(a), str(tmp_path)]).files == (a, b)


def test_resolve_errors(tmp_path):
    with pytest.raises(DfplanError, match="does not exist"):
        resolve_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DfplanError, match="no files matching"):
        resolve_corpus(str(tmp_path / "emptydir"))
    with pytest.raises(DfplanError, match="matches no files"):
        resolve_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(DfplanError, match="no corpus"):
        resolve_corpus([])


def test_unreadable_file(tmp_path, tok, monkeypatch):
    p = _write(tmp_path / "secret.txt", "x")
    # root reads files whatever their mode, so simulate the permission check failing
    monkeypatch.setattr("dfplan.corpus.os.access", lambda path, mode: False)
    with pytest.raises(DfplanError, match="not readable"):
        resolve_corpus(str(p))
    monkeypatch.undo()

    def deny(self):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("pathlib.Path.read_bytes", deny)
    with pytest.raises(DfplanError, match="cannot read corpus file .*Permission denied"):
        load_tokens(str(p), tok, cache_dir=tmp_path / "cache")


def test_binary_file_rejected(tmp_path, tok):
    p = tmp_path / "blob.txt"
    p.write_bytes(b"abc\x00\x01\x02")
    with pytest.raises(DfplanError, match="looks binary"):
        load_tokens(str(p), tok, cache_dir=tmp_path / "cache")


def test_builtin_corpus_is_deterministic_and_capped():
    files = builtin_files()
    assert files == builtin_files()
    assert all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert 1_000_000 < sum(f.stat().st_size for f in files) <= 4_000_000
    assert resolve_corpus(BUILTIN).files == tuple(files)
    small = builtin_files(max_bytes=50_000)
    assert 0 < sum(f.stat().st_size for f in small) <= 50_000
    held = builtin_files(heldout=True)
    assert held and not set(held) & set(files)            # held-out text is disjoint
    assert 100_000 < sum(f.stat().st_size for f in held) <= 1_000_000
    assert resolve_corpus(BUILTIN_HELDOUT).files == tuple(held)


def test_tokens_cached_and_keyed_by_content(tmp_path, tok):
    a = _write(tmp_path / "c" / "a.txt", "one two three four " * 50)
    b = _write(tmp_path / "c" / "b.txt", "five six seven " * 30)
    cache = tmp_path / "cache"
    s1 = load_tokens(str(tmp_path / "c"), tok, cache_dir=cache)
    assert not s1.cached and s1.tokens.dtype == np.uint16
    # files joined by end-of-text, one after each file
    assert int((s1.tokens == eos_id(tok)).sum()) == 2 and s1.tokens[-1] == eos_id(tok)
    assert tok.decode(s1.tokens[: len(tok.encode(a.read_text()).ids)].tolist()) == a.read_text()
    s2 = load_tokens(str(tmp_path / "c"), tok, cache_dir=cache)
    assert s2.cached and s2.key == s1.key and np.array_equal(s1.tokens, s2.tokens)
    # changing a file's bytes changes the key and the tokens
    b.write_text("eight eight " * 30)
    s3 = load_tokens(str(tmp_path / "c"), tok, cache_dir=cache)
    assert not s3.cached and s3.key != s1.key and not np.array_equal(s1.tokens, s3.tokens)
    # a different tokenizer is a different cache entry
    other = train_bpe(["alpha beta gamma"] * 50, 270)
    assert load_tokens(str(tmp_path / "c"), other, cache_dir=cache).key != s3.key
    assert not list((cache / "tokens").glob("*.tmp"))


def test_empty_corpus(tmp_path, tok):
    _write(tmp_path / "e.txt", "")
    with pytest.raises(DfplanError, match="empty"):
        load_tokens(str(tmp_path / "e.txt"), tok, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "tokens").exists() or not list((tmp_path / "cache" / "tokens").iterdir())


def test_split_by_contiguous_blocks():
    n_tok, L = 20_000, 16
    sp = split_windows(n_tok, L, valid_fraction=0.1, seed=3)
    all_starts = window_starts(n_tok, L)
    assert len(sp.train) + len(sp.valid) == len(all_starts)
    assert not set(sp.train) & set(sp.valid)
    assert 0.05 < len(sp.valid) / len(all_starts) < 0.15
    # contiguous blocks: valid starts come in runs of consecutive windows
    runs = np.split(sp.valid, np.where(np.diff(sp.valid) != L)[0] + 1)
    assert all(len(r) >= 16 for r in runs[:-1]) and len(runs) < len(sp.valid)
    assert all(s + L + 1 <= n_tok for s in all_starts)
    # seeded: same seed same split, other seed other split
    assert np.array_equal(split_windows(n_tok, L, 0.1, seed=3).valid, sp.valid)
    assert not np.array_equal(split_windows(n_tok, L, 0.1, seed=4).valid, sp.valid)


def test_split_small_and_too_short():
    sp = split_windows(2 * 8 + 1, 8)            # exactly two windows
    assert len(sp.train) == 1 and len(sp.valid) == 1
    with pytest.raises(DfplanError, match="corpus has 16 tokens but .* needs at least 17"):
        split_windows(16, 8)


def test_gather_and_sample_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    w = gather(tokens, np.array([0, 10]), 5)
    assert w.dtype == np.int64 and w.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    cal = sample_windows(tokens, 32, 64, seed=1)
    assert cal.shape == (32, 64)
    assert (np.diff(cal, axis=1) == 1).all()          # each row is one contiguous window
    assert np.array_equal(cal, sample_windows(tokens, 32, 64, seed=1))
    assert not np.array_equal(cal, sample_windows(tokens, 32, 64, seed=2))
    with pytest.raises(DfplanError, match="corpus has 1000 tokens but .* needs at least 2048"):
        sample_windows(tokens, 4, 2048)


def test_epoch_sampler_resume_matches_uninterrupted():
    ref = EpochSampler(10, 4, seed=7)
    batches = [ref.next_indices() for _ in range(8)]
    # every epoch is a permutation; epochs differ
    flat = np.concatenate(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))
    assert not np.array_equal(flat[:10], flat[10:20])
    s = EpochSampler(10, 4, seed=7)
    for _ in range(3):
        s.next_indices()
    state = s.state_dict()
    resumed = EpochSampler(10, 4, seed=7)
    resumed.load_state_dict(state)
    for b in batches[3:]:
        assert np.array_equal(resumed.next_indices(), b)
    with pytest.raises(DfplanError, match="different corpus"):
        EpochSampler(11, 4, seed=7).load_state_dict(state)


def test_unigram_ppl():
    rng = np.random.default_rng(0)
    V = 50
    uniform = rng.integers(0, V, 20_000)
    # uniform text: unigram ppl ~ vocab size
    assert abs(unigram_ppl(uniform, rng.integers(0, V, 5000), V) - V) < 2
    # skewed text: far below the vocab size
    skew = rng.choice(V, 20_000, p=np.r_[0.9, np.full(V - 1, 0.1 / (V - 1))])
    assert unigram_ppl(skew, skew[:5000], V) < 3


def test_long_text_pieces_cut_at_newlines(monkeypatch):
    import dfplan.data as data
    monkeypatch.setattr(data, "_PIECE_CHARS", 100)
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(200))
    pieces = data._pieces(text)
    assert "".join(pieces) == text and len(pieces) > 5
    assert all(len(p) <= 100 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
