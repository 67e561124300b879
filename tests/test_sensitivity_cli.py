"""`dfplan sensitivity` end to end: files, schema, 2-process gloo run, validation, bad input."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.formats.specs import parse_spec
from dfplan.formats.units import unit_index
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.sensitivity.analyzer import run_local
from dfplan.sensitivity.jobs import AnalyzerConfig
from dfplan.sensitivity.metrics import METRICS
from dfplan.sensitivity.table import read_table
from dfplan.sensitivity.validate import validate_table
from dfplan.tokenizer import train_bpe

WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random model with its own small BPE tokenizer, plus a corpus file."""
    d = tmp_path_factory.mktemp("teacher")
    rng = np.random.default_rng(0)
    tok = train_bpe([" ".join(rng.choice(WORDS, 40)) for _ in range(150)], 300)
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, vocab_size=tok.get_vocab_size())
    save_mamba_ssm(build_model(cfg, seed=0), d, tokenizer=tok)
    (d / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 40)) for _ in range(60)))
    return d


def run_cli(*args) -> int:
    return main(["sensitivity", *map(str, args)])


def base_args(teacher_dir, out, *extra):
    return ["--model", teacher_dir, "--corpus", teacher_dir / "corpus.txt", "--candidates", "fp32,int4,bin",
            "--windows", 4, "--seq-len", 32, "--batch-windows", 2, "--out", out, *extra]


def test_cli_writes_table_and_two_processes_match(teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))
    out1, out2 = tmp_path / "one" / "sensitivity.csv", tmp_path / "two" / "sensitivity.csv"
    assert run_cli(*base_args(teacher_dir, out1, "--threads", 1)) == 0
    for name in ("sensitivity.csv", "sensitivity.parquet", "sensitivity.json", "sensitivity_blocks.csv",
                 "sensitivity_blocks.parquet"):
        assert (out1.parent / name).is_file(), name
    assert not (out1.parent / "sensitivity.partial").exists()
    df = read_table(out1)
    assert list(df.columns[:6]) == ["unit", "kind", "block", "spec", "bytes", "params"]
    assert {*METRICS, "n_tokens", "seed"} <= set(df.columns)
    assert not df.duplicated(["unit", "spec"]).any()
    cfg = Mamba2Config.from_json(teacher_dir / "config.json")
    index = unit_index(cfg)
    for r in df.itertuples():
        assert str(parse_spec(r.spec)) == r.spec and r.bytes == parse_spec(r.spec).nbytes(index[r.unit].shape)
    assert (df["n_tokens"] == 4 * 32).all()
    pq = pd.read_parquet(out1.with_suffix(".parquet"))
    pd.testing.assert_frame_equal(pq, df)
    blocks = pd.read_csv(out1.parent / "sensitivity_blocks.csv")
    assert sorted(blocks["block"].unique()) == list(range(cfg.n_layer))
    prov = json.loads(out1.with_suffix(".json").read_text())
    assert prov["calibration"]["windows"] == 4 and prov["calibration"]["seq_len"] == 32
    assert prov["cost"]["block_forwards"] < prov["cost"]["full_forward_block_equivalent"]
    assert prov["model"]["weights_sha256"] and prov["calibration"]["token_stream_key"]

    # two gloo processes (one thread each) write the same table, byte for byte
    assert run_cli(*base_args(teacher_dir, out2, "--nproc", 2)) == 0
    assert out2.read_bytes() == out1.read_bytes()
    assert (out2.parent / "sensitivity_blocks.csv").read_bytes() == (out1.parent / "sensitivity_blocks.csv").read_bytes()
    assert json.loads(out2.with_suffix(".json").read_text())["cost"]["processes"] == 2

    # validation mechanics on the table just written
    vout = tmp_path / "one" / "validation.json"
    assert main(["sensitivity", "validate", "--model", str(teacher_dir), "--corpus", str(teacher_dir / "corpus.txt"),
                 "--table", str(out1), "--sample", "6", "--top-k", "2", "--heldout-windows", "2",
                 "--out", str(vout)]) == 0
    v = json.loads(vout.read_text())
    assert v["n_rows"] == 6 and set(v["spearman"]) == set(METRICS)
    assert v["provenance"]["heldout_disjoint_from_calibration"] is True
    assert vout.with_suffix(".md").read_text().count("|") > 10


def test_bad_input_is_one_clear_error(teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "s.csv"
    short = tmp_path / "short.txt"
    short.write_text(" ".join(WORDS[:30]))
    cases = [
        (base_args(teacher_dir, out)[:2] + ["--corpus", short, "--windows", 8, "--seq-len", 16, "--out", out],
         "too short"),
        (base_args(teacher_dir, out, "--candidates", "bin,int7"), "int7"),
        (["--model", teacher_dir, "--out", out], "--corpus"),
        (base_args(teacher_dir, tmp_path / "s.txt"), ".csv"),
        (base_args(teacher_dir, out, "--units", "nothing.*"), "matches no compressible unit"),
    ]
    for args, needle in cases:
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not out.exists()


@torch.no_grad()
def sample_from(model, n: int, length: int, seed: int) -> np.ndarray:
    """Token windows drawn from the model itself: then E[delta CE] = KL(teacher || compressed)."""
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(0, V, (n,), generator=g)]
    cache = model.new_cache(n)
    for _ in range(length - 1):
        p = torch.softmax(model.step(out[-1], cache)[:, :V].float(), -1)
        out.append(torch.multinomial(p, 1, generator=g)[:, 0])
    return torch.stack(out, 1).numpy()


def test_validation_kl_tracks_true_perplexity_when_data_comes_from_the_teacher():
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, vocab_size=512)
    model = build_model(cfg, seed=0).eval()
    model.backbone.embedding.weight.data.mul_(6)      # peaked next-token distributions (tied head)
    calib, held = sample_from(model, 8, 33, 0), sample_from(model, 16, 33, 1)
    res = run_local(model, calib, AnalyzerConfig(candidates=tuple(parse_spec(s) for s in ("int8", "int4", "int2", "bin")),
                                                 batch_windows=8, blocks=False))
    table = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in res.rows])
    v = validate_table(model, table, held, sample=0, top_k=(2,), seed=0)
    assert v["n_rows"] == len(table)
    assert v["spearman"]["kl"]["rho"] > 0.6
    by = {(s["metric"], s["which"]): s["true_dppl"] for s in v["joint"]["sets"]}
    assert by[("kl", "riskiest")] > by[("kl", "safest")]
    assert v["joint"]["spec"] == "bin"
