"""Held-out evaluation: perplexity maths, and `dfplan eval` on a checkpoint and on a packed artifact."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.data import stream_windows
from dfplan.evaluate import kl_to_teacher, perplexity
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import save_tokenizer, train_bpe

CFG = Mamba2Config.preset("tiny").replace(vocab_size=400, chunk_size=16, n_layer=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))


def _text(seed, n=1200):
    rng = random.Random(seed)
    words = ["state", "space", "model", "mamba", "scan", "chunk", "token", "layer", "bit", "rank"]
    return " ".join(rng.choice(words) for _ in range(n)) + "\n"


def test_perplexity_matches_manual_cross_entropy():
    model = build_model(CFG, seed=0).eval()
    w = torch.randint(0, CFG.vocab_size, (5, 17), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, w.numpy(), batch_size=2, vocab_size=CFG.vocab_size)
    with torch.no_grad():
        logits = model(w[:, :-1])[..., :CFG.vocab_size]
    nll = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten()).item()
    assert res.n_tokens == 5 * 16 and res.n_windows == 5
    assert math.isclose(res.nll, nll, rel_tol=1e-5) and math.isclose(res.ppl, math.exp(nll), rel_tol=1e-5)


def test_kl_is_zero_to_itself_and_positive_to_another_model():
    a, b = build_model(CFG, seed=0).eval(), build_model(CFG, seed=1).eval()
    w = torch.randint(0, CFG.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1)).numpy()
    assert abs(kl_to_teacher(a, a, w, vocab_size=CFG.vocab_size)) < 1e-6
    assert kl_to_teacher(a, b, w, vocab_size=CFG.vocab_size) > 1e-3


def test_stream_windows_are_deterministic_and_capped():
    import numpy as np
    toks = np.arange(1000)
    w = stream_windows(toks, 31, max_windows=5)
    assert w.shape == (5, 32) and np.array_equal(w, stream_windows(toks, 31, max_windows=5))
    assert (np.diff(w[:, 0]) > 0).all()


def test_eval_cli_on_checkpoint_and_packed_artifact(tmp_path, capsys):
    from dfplan.formats.apply import apply_plan
    from dfplan.formats.layouts import layout_plan
    from dfplan.packed import save_packed

    tok = train_bpe([_text(0)], CFG.vocab_size)
    teacher = build_model(CFG, seed=0).eval()
    save_mamba_ssm(teacher, tmp_path / "teacher", tokenizer=tok)
    held = tmp_path / "held.txt"
    held.write_text(_text(1, 800))

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "teacher"), "--corpus", str(held), "--seq-len", "32",
                 "--windows", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_windows"] == 4 and res["ppl"] > 1

    plan = layout_plan("dfssm", CFG)
    student = apply_plan(build_model(CFG, seed=0).eval(), plan)
    save_packed(student, plan, tmp_path / "student")
    save_tokenizer(tok, tmp_path / "student")
    out2 = tmp_path / "eval2.json"
    assert main(["eval", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
                 "--corpus", str(held), "--seq-len", "32", "--windows", "4", "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["teacher_ppl"] == pytest.approx(res["ppl"], rel=1e-6)
    assert res2["kl_to_teacher"] > 0 and res2["ppl"] != res["ppl"]


def test_eval_cli_without_tokenizer_fails_cleanly(tmp_path, capsys):
    save_mamba_ssm(build_model(CFG, seed=0), tmp_path / "m")
    held = tmp_path / "held.txt"
    held.write_text(_text(1, 200))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "m"), "--corpus", str(held), "--out", str(out)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert not out.exists()
