"""A distillation interrupted during export is finished by a rerun, with or without --resume,
and ends with the same student as a run that was never interrupted."""
import json
import os

import numpy as np
import pytest

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.distill import run as drun
from dfplan.fileio import sha256_file
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import train_bpe

CFG = Mamba2Config.preset("tiny").replace(d_model=32, n_layer=2, vocab_size=300, d_state=16, headdim=16,
                                          chunk_size=16, name="micro")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-export")
    rng = np.random.default_rng(3)
    words = ["the cat", "a dog", "my model", "eats", "sees", "fish", "bits", "tokens"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 4)) + "." for _ in range(1200)) + "\n")
    tok = train_bpe([corpus.read_text()], CFG.vocab_size)
    teacher = root / "teacher"
    save_mamba_ssm(build_model(CFG, seed=0), teacher, tokenizer=tok)
    ref = root / "ref"
    assert main(_args(teacher, corpus, ref)) == 0
    return {"teacher": teacher, "corpus": corpus, "ref": ref}


def _args(teacher, corpus, out, *extra):
    return ["distill", "--teacher", str(teacher), "--plan", "layout:dfssm", "--corpus", str(corpus),
            "--tokens", "1k", "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--eval-windows", "4", "--checkpoint-every", "2", "--threads", "1", *extra]


def test_packed_files_have_ordinary_modes(files):
    umask = os.umask(0)
    os.umask(umask)
    for f in files["ref"].iterdir():
        if f.is_file():
            assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def _same_student(a, b):
    assert sha256_file(a / "model.safetensors") == sha256_file(b / "model.safetensors")
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (a, b))
    assert ea["student"] == eb["student"]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way cleans up."""


@pytest.mark.parametrize("where", ["evaluate", "publish"])
@pytest.mark.parametrize("resume", [False, True])
def test_export_killed_then_rerun_finishes(files, tmp_path, monkeypatch, where, resume):
    out = tmp_path / "student"
    if where == "evaluate":                 # killed after the artifact, before the reports
        monkeypatch.setattr(drun, "evaluate_all", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    else:                                   # killed half-way through moving the files in
        def publish(stage, out):
            for f in sorted(stage.iterdir())[:3]:
                f.rename(out / f.name)
            raise Killed()
        monkeypatch.setattr(drun, "publish", publish)
    with pytest.raises(Killed):
        main(_args(files["teacher"], files["corpus"], out))
    monkeypatch.undo()
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))
    assert not drun.complete(out) and (out / "checkpoint.pt").exists()
    assert main(_args(files["teacher"], files["corpus"], out, *(["--resume"] if resume else []))) == 0
    assert drun.complete(out) and not (out / "checkpoint.pt").exists() and not (out / ".export").exists()
    _same_student(out, files["ref"])


def test_old_style_half_export_is_finished(files, tmp_path, capsys):
    """manifest + weights without eval.json (an export killed by an older dfplan): finished from
    the checkpoint; without a checkpoint it is refused with one line instead of 'already holds'."""
    out = tmp_path / "student"
    from dfplan.distill.run import DistillJob, run_distill
    from dfplan.distill.trainer import DistillConfig
    job = DistillJob(teacher=str(files["teacher"]), plan="layout:dfssm", corpus=(str(files["corpus"]),),
                     out=str(out), config=DistillConfig(tokens=1000, seq_len=32, batch_size=4,
                                                        checkpoint_every=2), eval_windows=4)
    assert run_distill(job, say=lambda m: None, progress=False, stop_after=3) is None
    for f in ("model.safetensors", "manifest.json"):
        (out / f).write_bytes((files["ref"] / f).read_bytes())
    assert main(_args(files["teacher"], files["corpus"], out)) == 0
    _same_student(out, files["ref"])
    capsys.readouterr()
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text("{}")
    assert main(_args(files["teacher"], files["corpus"], bare)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "without eval.json" in err[-1]
    assert not any(line.startswith("error") for line in err[:-1])
