"""Built-in teacher training: outputs, resume equivalence, bad input leaves nothing behind."""
import json

import numpy as np
import pytest
import torch

from dfplan.errors import DfplanError
from dfplan.lr import lr_factor
from dfplan.zoo import CHECKPOINT, META, TrainConfig, find_teachers, preset_rows, train_teacher


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # structured text (repeating grammar) so a few steps measurably learn something
    rng = np.random.default_rng(0)
    subj, verb, obj = ["the cat", "a dog", "my model"], ["eats", "sees", "scans"], ["fish", "states", "tokens"]
    lines = [f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(3000)]
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def _tc(out, corpus_path, **kw):
    corpus = kw.pop("corpus", (str(corpus_path),))
    base = dict(out=str(out), preset="tiny", corpus=corpus, steps=6, seq_len=32, batch_size=4,
                lr=3e-3, eval_every=3, ckpt_every=3, eval_windows=8, final_eval_windows=16, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(msg):
    pass


def test_lr_schedule():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))          # monotone decay after warmup
    assert f[-1] == pytest.approx(0.1, abs=1e-3)


def test_train_writes_loadable_teacher(tmp_path, corpus):
    out = tmp_path / "t"
    meta = train_teacher(_tc(out, corpus), say=_quiet, progress=False)
    for name in ("config.json", "pytorch_model.bin", "tokenizer.json", META, "train_log.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT).exists()          # the run is finished: no resume state left
    assert json.loads((out / META).read_text()) == meta
    assert meta["tokens_seen"] == 6 * 4 * 32 and meta["steps"] == 6
    assert np.isfinite(meta["val_ppl"]) and meta["val_ppl"] > 1 and meta["unigram_ppl"] > 1
    assert meta["tokens_per_s"] > 0 and meta["val_tokens"] > 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 6]
    # the saved folder loads as a mamba_ssm checkpoint with its tokenizer
    from dfplan.loading import load_model
    model, tok = load_model(str(out))
    assert tok is not None and tok.get_vocab_size() <= model.config.vocab_size
    assert model.config.d_model == 128 and model.config.n_layer == 4
    ids = torch.tensor([tok.encode("the cat eats fish.").ids])
    assert torch.isfinite(model(ids)).all()
    # finished: rerunning without --resume refuses, with --resume it is a no-op
    with pytest.raises(DfplanError, match="already holds a trained teacher"):
        train_teacher(_tc(out, corpus), say=_quiet, progress=False)
    assert train_teacher(_tc(out, corpus, resume=True), say=_quiet, progress=False) == meta
    assert [t.path for t in find_teachers(tmp_path)] == [str(out)]


def test_training_beats_unigram(tmp_path, corpus):
    meta = train_teacher(_tc(tmp_path / "t", corpus, steps=40, eval_every=40, lr=5e-3, batch_size=8),
                         say=_quiet, progress=False)
    assert meta["val_ppl"] < meta["unigram_ppl"]


def test_resume_matches_uninterrupted(tmp_path, corpus):
    ref = train_teacher(_tc(tmp_path / "ref", corpus), say=_quiet, progress=False)

    def stop_at_4(step):
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train_teacher(_tc(out, corpus), say=_quiet, progress=False, on_step=stop_at_4)
    assert (out / CHECKPOINT).is_file() and not (out / META).exists()
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] == 4
    with pytest.raises(DfplanError, match="unfinished run"):
        train_teacher(_tc(out, corpus), say=_quiet, progress=False)
    resumed = train_teacher(_tc(out, corpus, resume=True), say=_quiet, progress=False)
    assert resumed["tokens_seen"] == ref["tokens_seen"]
    assert resumed["val_ppl"] == pytest.approx(ref["val_ppl"], rel=1e-5)
    a = torch.load(tmp_path / "ref" / "pytorch_model.bin", weights_only=True)
    b = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resume_with_other_corpus_refused(tmp_path, corpus):
    out = tmp_path / "cut"

    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_teacher(_tc(out, corpus), say=_quiet, progress=False, on_step=stop)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    with pytest.raises(DfplanError, match="different corpus"):
        train_teacher(_tc(out, other, resume=True), say=_quiet, progress=False)


@pytest.mark.parametrize("kw, msg", [
    (dict(preset="huge"), "unknown teacher preset"),
    (dict(preset="130m"), "unknown teacher preset"),
    (dict(steps=0), "--steps must be positive"),
    (dict(corpus=("/nonexistent/dir/x.txt",)), "does not exist"),
    (dict(seq_len=100_000), "corpus has .* tokens but .* needs at least 200001"),
])
def test_bad_input_writes_nothing(tmp_path, corpus, kw, msg):
    out = tmp_path / "never"
    with pytest.raises(DfplanError, match=msg):
        train_teacher(_tc(out, corpus, **kw), say=_quiet, progress=False)
    assert not out.exists()


def test_preset_rows():
    rows = {r["preset"]: r for r in preset_rows()}
    assert rows["tiny"]["d_model"] == 128 and rows["tiny"]["vocab"] == 4096
    assert rows["small"]["n_layer"] == 6 and rows["small"]["params"] > rows["tiny"]["params"] > 0
