"""`dfplan distill` from the command line: a finished run's files, and bad input that leaves
nothing behind."""
import json

import numpy as np
import pytest
import torch

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import save_tokenizer, train_bpe


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))


def _text(seed, n=1500):
    rng = np.random.default_rng(seed)
    subj, verb, obj = ["the cat", "a dog", "my model", "our state"], ["eats", "sees", "scans"], ["fish", "tokens", "bits"]
    return "\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n)) + "\n"


CFG = Mamba2Config.preset("tiny").replace(d_model=32, n_layer=2, vocab_size=300, d_state=16, headdim=16,
                                          chunk_size=16, name="micro")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-cli")
    corpus = root / "corpus.txt"
    corpus.write_text(_text(0))
    tok = train_bpe([corpus.read_text()], CFG.vocab_size)
    teacher = root / "teacher"
    save_mamba_ssm(build_model(CFG, seed=0), teacher, tokenizer=tok)
    other = root / "other-tok"
    other.mkdir()
    save_tokenizer(train_bpe([_text(1, 300) + "zebra quartz jukebox"], 290), other)
    return {"root": root, "corpus": corpus, "teacher": teacher, "other_tok": other / "tokenizer.json"}


def _args(files, out, *extra, tokens="1k"):
    return ["distill", "--teacher", str(files["teacher"]), "--plan", "layout:dfssm", "--corpus",
            str(files["corpus"]), "--tokens", tokens, "--out", str(out), "--seq-len", "32",
            "--batch-size", "4", "--eval-windows", "4", "--checkpoint-every", "2", "--threads", "1", *extra]


def test_cli_run_writes_a_verified_packed_student(files, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(_args(files, out)) == 0
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "plan.json", "manifest.json", "tokenizer.json",
            "eval.json", "distill.json", "train_log.jsonl"} <= names
    assert "checkpoint.pt" not in names
    ev = json.loads((out / "eval.json").read_text())
    assert ev["export_check"]["exact"] and ev["export_check"]["max_abs_ref"] <= 1e-4
    for k in ("teacher", "ptq", "scaffold_only", "student"):
        assert np.isfinite(ev[k]["ppl"]) and ev[k]["ppl"] > 1
    assert ev["teacher"]["kl_to_teacher"] == 0.0 and ev["student"]["kl_to_teacher"] >= 0.0
    meta = json.loads((out / "distill.json").read_text())
    assert meta["tokens_seen"] >= 1000 and meta["tokens_per_s"] > 0 and meta["compression"] > 1
    from dfplan.packed import load_packed
    m = load_packed(out)
    assert m(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, CFG.vocab_padded)
    # a second run into the finished folder is refused
    assert main(_args(files, out)) == 2
    assert "already holds a packed student" in capsys.readouterr().err


def _plan_for_other_model(path):
    from dfplan.formats.layouts import layout_plan
    layout_plan("dfssm", CFG.replace(d_model=64, name="bigger")).to_json(path)
    return path


@pytest.mark.parametrize("case", ["other_model", "tokenizer_mismatch", "vocab_too_big", "zero_tokens",
                                  "out_under_a_file", "out_not_empty", "no_tokenizer"])
def test_bad_input_fails_clearly_and_writes_nothing(files, tmp_path, capsys, case):
    out = tmp_path / "run" / "student"
    extra, tokens, msg, args = [], "1k", None, None
    if case == "other_model":
        args = _args(files, out)
        args[args.index("layout:dfssm")] = str(_plan_for_other_model(tmp_path / "plan.json"))
        msg = "different model"
    elif case == "tokenizer_mismatch":
        extra = ["--tokenizer", str(files["other_tok"])]
        msg = "differs from the teacher's own tokenizer"
    elif case == "vocab_too_big":
        big = tmp_path / "big"
        big.mkdir()
        save_tokenizer(train_bpe([_text(2) + "".join(chr(0x4e00 + i) for i in range(400))], 600), big)
        t2 = tmp_path / "teacher-no-tok"
        save_mamba_ssm(build_model(CFG, seed=0), t2)
        args = _args(files, out, "--tokenizer", str(big / "tokenizer.json"))
        args[args.index(str(files["teacher"]))] = str(t2)
        msg = "vocab_size"
    elif case == "no_tokenizer":
        t2 = tmp_path / "teacher-no-tok"
        save_mamba_ssm(build_model(CFG, seed=0), t2)
        args = _args(files, out)
        args[args.index(str(files["teacher"]))] = str(t2)
        msg = "no tokenizer.json"
    elif case == "zero_tokens":
        tokens, msg = "0", "token budget"
    elif case == "out_under_a_file":
        blocker = tmp_path / "run"
        blocker.write_text("not a folder")
        msg = "not a writable folder"
    elif case == "out_not_empty":
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        msg = "not empty"
    args = args or _args(files, out, *extra, tokens=tokens)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before       # nothing written


def test_resume_from_the_cli(files, tmp_path, capsys):
    """An interrupted CLI run refuses to restart without --resume and finishes with it."""
    from dfplan.distill.run import DistillJob, run_distill
    from dfplan.distill.trainer import DistillConfig
    out = tmp_path / "student"
    job = DistillJob(teacher=str(files["teacher"]), plan="layout:dfssm", corpus=(str(files["corpus"]),),
                     out=str(out), config=DistillConfig(tokens=1000, seq_len=32, batch_size=4,
                                                        checkpoint_every=2), eval_windows=4)
    assert run_distill(job, say=lambda m: None, progress=False, stop_after=3) is None
    assert (out / "checkpoint.pt").is_file() and not (out / "manifest.json").exists()
    assert main(_args(files, out)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_args(files, out, "--resume")) == 0
    assert (out / "manifest.json").is_file() and not (out / "checkpoint.pt").exists()
