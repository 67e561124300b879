"""SIGKILL every long command at several points; the rerun finishes with the result of a run
that was never interrupted.

The killed run is a fresh interpreter that kills itself (SIGKILL: no cleanup, no finally) at
a chosen point: the n-th atomic rename whose target contains a name (checkpoints, partial
sensitivity results, the export's files, the publish of a packed student), or after n
finished Optuna trials. Reference runs and reruns go through dfplan.cli.main in-process.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import train_bpe

pytestmark = pytest.mark.slow

CFG = Mamba2Config.preset("tiny").replace(d_model=32, n_layer=2, vocab_size=300, d_state=16, headdim=16,
                                          chunk_size=16, name="micro")

# the killed process: patch, then run the CLI; exits only by SIGKILL when the point is reached
DRIVER = r"""
import os, signal, sys
kind, what, n = os.environ["KILL_AT"].split(":")
n = int(n)
seen = [0]
def hit():
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if kind == "replace":
    real = os.replace
    def replace(src, dst, *a, **k):
        if what in str(dst):
            hit()
        return real(src, dst, *a, **k)
    os.replace = replace
else:
    import optuna
    real_opt = optuna.study.Study.optimize
    def optimize(self, *a, callbacks=None, **k):
        return real_opt(self, *a, callbacks=list(callbacks or []) + [lambda s, t: hit()], **k)
    optuna.study.Study.optimize = optimize
from dfplan.cli import main
rc = main(sys.argv[1:])
sys.exit(100 + rc)          # reaching the end means the kill point was never hit
"""


def _killed(args, kill_at, tmp_path):
    env = {**os.environ, "KILL_AT": kill_at, "OMP_NUM_THREADS": "1",
           "DFPLAN_CACHE_DIR": os.environ["DFPLAN_CACHE_DIR"]}
    r = subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == -9, (kill_at, r.returncode, r.stderr[-3000:])


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(5)
    words = ["the cat", "a dog", "my model", "eats", "sees", "fish", "bits", "tokens", "quietly", "now"]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words, 5)) + "." for _ in range(1500)) + "\n")
    tok = train_bpe([corpus.read_text()], CFG.vocab_size)
    teacher = root / "teacher"
    save_mamba_ssm(build_model(CFG, seed=0), teacher, tokenizer=tok)
    return {"root": root, "corpus": corpus, "teacher": teacher}


# -- teacher training ---------------------------------------------------------------------------

def _zoo_args(files, out):
    return ["zoo", "train", "--preset", "tiny", "--corpus", str(files["corpus"]), "--out", str(out),
            "--steps", "6", "--seq-len", "32", "--batch-size", "2", "--eval-every", "2", "--ckpt-every", "2",
            "--threads", "1"]


@pytest.mark.parametrize("point", ["replace:checkpoint:1", "replace:checkpoint:2", "replace:zoo.json:1"])
def test_teacher_training(files, tmp_path, point):
    ref = files["root"] / "zoo-ref"
    if not ref.exists():
        assert main(_zoo_args(files, ref)) == 0
    out = tmp_path / "teacher"
    _killed(_zoo_args(files, out), point, tmp_path)
    assert main(_zoo_args(files, out) + ["--resume"]) == 0
    # the same tensors (torch.save's zip names its folder after the temp file, so not the same bytes)
    from dfplan.loading import load_model
    a, b = (load_model(str(d))[0].state_dict() for d in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- sensitivity ----------------------------------------------------------------------------------

def _sens_args(files, out):
    return ["sensitivity", "--model", str(files["teacher"]), "--corpus", str(files["corpus"]),
            "--out", str(out), "--windows", "4", "--seq-len", "32", "--candidates", "bin,bin+r8,int4",
            "--threads", "1"]


def _table(path):
    import pandas as pd
    df = pd.read_csv(path, comment="#")
    return df[[c for c in df.columns if "time" not in c and not c.endswith("_s")]]


@pytest.mark.parametrize("point", ["replace:.partial:2", "replace:.partial:5", "replace:sensitivity.csv:1"])
def test_sensitivity(files, tmp_path, point):
    ref = files["root"] / "sens-ref" / "sensitivity.csv"
    if not ref.exists():
        assert main(_sens_args(files, ref)) == 0
    out = tmp_path / "run" / "sensitivity.csv"
    _killed(_sens_args(files, out), point, tmp_path)
    assert main(_sens_args(files, out)) == 0
    a, b = _table(out), _table(ref)
    assert a.equals(b), (a.compare(b) if a.shape == b.shape else (a.shape, b.shape))


# -- search with Optuna -----------------------------------------------------------------------------

def _search_args(files, out, table):
    return ["search", "--model", str(files["teacher"]), "--sensitivity", str(table), "--budget", "20kB",
            "--out", str(out), "--solver", "tpe", "--trials", "12", "--front-points", "3", "--seed", "0"]


@pytest.mark.parametrize("point", ["trials:1:3", "trials:1:9", "replace:plan.json:1"])
def test_search_with_optuna(files, tmp_path, point):
    table = files["root"] / "sens-ref" / "sensitivity.csv"
    if not table.exists():
        assert main(_sens_args(files, table)) == 0
    ref = files["root"] / "search-ref"
    if not ref.exists():
        assert main(_search_args(files, ref, table)) == 0
    out = tmp_path / "run"
    _killed(_search_args(files, out, table), point, tmp_path)
    assert main(_search_args(files, out, table)) == 0
    a, b = (json.loads((d / "plan.json").read_text()) for d in (out, ref))
    assert a["specs"] == b["specs"] and a["predicted_bytes"] == b["predicted_bytes"]
    import optuna
    studies = optuna.get_all_study_summaries(f"sqlite:///{out / 'study.db'}")
    assert studies and all(s.n_trials >= 12 for s in studies)


# -- distillation: stage 1, stage 2, export, publish -----------------------------------------------

def _distill_args(files, out):
    return ["distill", "--teacher", str(files["teacher"]), "--plan", "layout:dfssm", "--corpus",
            str(files["corpus"]), "--tokens", "1k", "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--eval-windows", "4", "--checkpoint-every", "2", "--threads", "1"]


@pytest.mark.parametrize("point", ["replace:checkpoint.pt:1", "replace:checkpoint.pt:3",
                                   "replace:model.safetensors:1", "replace:manifest.json:2"])
def test_distill(files, tmp_path, point):
    ref = files["root"] / "distill-ref"
    if not ref.exists():
        assert main(_distill_args(files, ref)) == 0
    out = tmp_path / "student"
    _killed(_distill_args(files, out), point, tmp_path)
    assert main(_distill_args(files, out) + ["--resume"]) == 0
    assert _sha(out / "model.safetensors") == _sha(ref / "model.safetensors")
    ea, eb = (json.loads((d / "eval.json").read_text()) for d in (out, ref))
    assert ea["student"] == eb["student"]
    assert not (out / "checkpoint.pt").exists() and not (out / ".export").exists()


# -- pack -----------------------------------------------------------------------------------------

def _pack_args(files, out):
    return ["pack", "--model", str(files["teacher"]), "--plan", "layout:dfssm", "--out", str(out),
            "--threads", "1"]


@pytest.mark.parametrize("point", ["replace:model.safetensors:1", "replace:manifest.json:1"])
def test_pack(files, tmp_path, point):
    ref = files["root"] / "pack-ref"
    if not ref.exists():
        assert main(_pack_args(files, ref)) == 0
    out = tmp_path / "packed"
    _killed(_pack_args(files, out), point, tmp_path)
    assert main(_pack_args(files, out)) == 0
    assert _sha(out / "model.safetensors") == _sha(ref / "model.safetensors")
    assert json.loads((out / "manifest.json").read_text())["files"] == \
        json.loads((ref / "manifest.json").read_text())["files"]


# -- bench ---------------------------------------------------------------------------------------
# Timings differ from run to run, so the rerun is checked for a complete, well-formed result of
# the same cases (not for equal numbers); the killed run must leave no result file behind.

def _bench_kernels_args(out):
    return ["bench", "kernels", "--out", str(out), "--model", "tiny", "--units", "in_proj", "--impls",
            "int8,fp32", "--batch", "1", "--budget", "0.01", "--bandwidth-mib", "16", "--threads", "1"]


def test_bench_kernels(tmp_path):
    out = tmp_path / "bench"
    _killed(_bench_kernels_args(out), "replace:kernels.json:1", tmp_path)
    assert not (out / "kernels.json").exists()          # killed at the rename: no half result
    assert main(_bench_kernels_args(out)) == 0
    rows = json.loads((out / "kernels.json").read_text())["rows"]
    assert {(r["unit"], r["impl"], r["batch"]) for r in rows} == {("in_proj", "int8", 1), ("in_proj", "fp32", 1)}
    assert all(r["median_ms"] > 0 for r in rows)


def _bench_e2e_args(files, out, tmp_path):
    return ["bench", "e2e", "--model", str(files["teacher"]), "--variants", "dfplan-fp32,dfplan-packed",
            "--prompt-len", "8", "--gen", "2", "--batch", "1", "--min-samples", "10", "--min-time", "0",
            "--warmup", "1", "--no-isolate", "--threads", "1", "--bandwidth-mib", "16",
            "--cache-dir", str(tmp_path / "bench-cache"), "--out", str(out)]


def test_bench_e2e(files, tmp_path):
    from dfplan.bench import schema

    out = tmp_path / "e2e.json"
    _killed(_bench_e2e_args(files, out, tmp_path), "replace:e2e.json:1", tmp_path)
    assert not out.exists()
    assert main(_bench_e2e_args(files, out, tmp_path)) == 0
    res = schema.load(out)                                # validates the schema and digest
    for name in ("dfplan-fp32", "dfplan-packed"):
        assert res["variants"][name]["status"] == "ok"
        assert res["variants"][name]["cases"]["b1"]["metrics"]["decode_ms_per_token"]["n"] >= 10
