"""KL sensitivity analyzer: exactness of the cached prefix, batching, metrics, resume, bad input."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.quant import fake_quant
from dfplan.formats.specs import DEFAULT_CANDIDATES, parse_spec
from dfplan.formats.units import compressible_units, unit_index
from dfplan.model import build_model
from dfplan.sensitivity import analyzer as A
from dfplan.sensitivity.analyzer import compressed, run_local
from dfplan.sensitivity.jobs import AnalyzerConfig, parse_candidates, plan_jobs
from dfplan.sensitivity.metrics import LogitSums, SqnrSums
from dfplan.sensitivity.resume import PartialStore

LOGIT_METRICS = ("kl", "rkl", "dce", "mse", "cos")


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: one thread skips OpenMP hand-offs that dominate (and stall on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def specs(*names):
    return tuple(parse_spec(n) for n in names)


def windows(cfg, n=4, length=33, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(n, length))


def acfg(names=("fp32", "int4", "bin"), **kw):
    kw.setdefault("batch_windows", 2)
    return AnalyzerConfig(candidates=specs(*names), **kw)


@torch.no_grad()
def full_forward_metrics(model, w, assignment) -> dict:
    """Reference: the whole model run from token ids with the units compressed, no cache."""
    V = model.config.vocab_size
    x = torch.as_tensor(w)
    t = model(x[:, :-1])[..., :V].float()
    with compressed(model, assignment):
        s = model(x[:, :-1])[..., :V].float()
    acc = LogitSums()
    acc.add(t, s, x[:, 1:])
    return acc.result()


def row_of(rows, unit, spec):
    (r,) = [r for r in rows if r["unit"] == unit and r["spec"] == spec]
    return r


def test_metrics_against_direct_formulas():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    tg = torch.randint(0, 11, (2, 5), generator=g)
    acc = LogitSums()
    acc.add(t[:1], s[:1], tg[:1])          # two micro-batches must sum like one
    acc.add(t[1:], s[1:], tg[1:])
    r = acc.result()
    pt, ps = t.double().softmax(-1), s.double().softmax(-1)
    assert r["kl"] == pytest.approx(float((pt * (pt.log() - ps.log())).sum(-1).mean()), rel=1e-5)
    assert r["rkl"] == pytest.approx(float((ps * (ps.log() - pt.log())).sum(-1).mean()), rel=1e-5)
    ce = lambda z: F.cross_entropy(z.flatten(0, 1).double(), tg.flatten())
    assert r["dce"] == pytest.approx(float(ce(s) - ce(t)), rel=1e-5)
    assert r["mse"] == pytest.approx(float((s - t).square().mean()), rel=1e-5)
    assert r["cos"] == pytest.approx(float(F.cosine_similarity(s, t, dim=-1).mean()), rel=1e-5)
    q = SqnrSums()
    q.add(t, s)
    assert q.db == pytest.approx(10 * math.log10(float(t.square().sum() / (s - t).square().sum())), rel=1e-5)


def test_keep_fp32_scores_zero(tiny_model, tiny_cfg):
    res = run_local(tiny_model, windows(tiny_cfg), acfg())
    fp32 = [r for r in res.rows if r["spec"] == "fp32"]
    assert len(fp32) == len(compressible_units(tiny_cfg))
    for r in fp32:
        assert r["kl"] == 0.0 and r["rkl"] == 0.0 and r["dce"] == 0.0 and r["mse"] == 0.0
        assert r["sqnr"] == math.inf
    for r in res.block_rows:
        if r["spec"] == "fp32":
            assert r["kl"] == 0.0 and r["sqnr"] == math.inf
    # and compression does register: every lossy row moves the distribution
    assert all(r["kl"] > 0 and math.isfinite(r["sqnr"]) for r in res.rows if r["spec"] != "fp32")


def test_coarser_formats_score_higher_on_average(tiny_model, tiny_cfg):
    res = run_local(tiny_model, windows(tiny_cfg), AnalyzerConfig(candidates=DEFAULT_CANDIDATES, batch_windows=4,
                                                                   blocks=False))
    mean = pd.DataFrame(res.rows).groupby("spec")["kl"].mean()
    assert mean["fp16"] < mean["int8"] < mean["int4"] < mean["int3"] < mean["int2"]
    assert mean["bin+r128"] < mean["bin+r64"] < mean["bin+r32"] < mean["bin+r16"] < mean["bin+r8"] < mean["bin"]
    assert mean["int4"] < mean["bin"]
    # bytes follow the formats' own accounting, and the spec names round-trip
    index = unit_index(tiny_cfg)
    for r in res.rows:
        spec = parse_spec(r["spec"])
        assert str(spec) == r["spec"] and r["bytes"] == spec.nbytes(index[r["unit"]].shape)
    # the embedding only gets the formats it may take
    assert {r["spec"] for r in res.rows if r["kind"] == "embedding"} == {"int2", "int3", "int4", "int8", "fp16"}


def test_cached_prefix_equals_full_forward(tiny_model, tiny_cfg):
    w = windows(tiny_cfg, n=3, seed=2)                 # 3 windows, micro-batches of 2: a ragged last batch
    res = run_local(tiny_model, w, acfg(("int4", "bin", "bin+r16")))
    cases = [("backbone.embedding", "int4"), ("backbone.layers.0.mixer.in_proj", "bin"),
             ("backbone.layers.2.mixer.out_proj", "bin+r16"), ("backbone.layers.3.mixer.in_proj", "int4")]
    for unit, spec in cases:
        ref = full_forward_metrics(tiny_model, w, {unit: parse_spec(spec)})
        got = row_of(res.rows, unit, spec)
        for m in LOGIT_METRICS:
            assert got[m] == pytest.approx(ref[m], rel=1e-6, abs=1e-12), (unit, spec, m)
    # a whole block at one format equals compressing its units together in a full forward
    for b in res.block_rows:
        if b["block"] == 1 and b["spec"] == "bin":
            ref = full_forward_metrics(tiny_model, w, {f"backbone.layers.1.mixer.{p}": parse_spec("bin")
                                                       for p in ("in_proj", "out_proj")})
            for m in LOGIT_METRICS:
                assert b[m] == pytest.approx(ref[m], rel=1e-6, abs=1e-12)
    # the cache costs one teacher pass; candidates run only their suffix
    L = tiny_cfg.n_layer
    assert res.teacher_block_forwards == L
    assert res.block_forwards < res.full_forward_equivalent


def test_unit_sqnr_is_the_units_output_sqnr(tiny_model, tiny_cfg):
    w = windows(tiny_cfg, n=2)
    res = run_local(tiny_model, w, acfg(("int4",), blocks=False))
    # block 0's in_proj sees norm(embedding) of the calibration tokens
    x = torch.as_tensor(w)[:, :-1]
    blk = tiny_model.backbone.layers[0]
    with torch.no_grad():
        u = blk.norm(tiny_model.embed(x).float())
        W = blk.mixer.in_proj.weight
        y, y_hat = F.linear(u, W), F.linear(u, fake_quant(W, parse_spec("int4")))
    want = 10 * math.log10(float(y.double().square().sum() / (y_hat - y).double().square().sum()))
    assert row_of(res.rows, "backbone.layers.0.mixer.in_proj", "int4")["sqnr"] == pytest.approx(want, rel=1e-4)


def test_batched_candidates_equal_one_at_a_time(tiny_model, tiny_cfg):
    w = windows(tiny_cfg)
    together = run_local(tiny_model, w, acfg(max_batch_tokens=10**6))
    alone = run_local(tiny_model, w, acfg(max_batch_tokens=1))
    for a, b in zip(together.rows, alone.rows):
        assert a["unit"] == b["unit"] and a["spec"] == b["spec"]
        for m in LOGIT_METRICS:
            assert a[m] == pytest.approx(b[m], rel=1e-6, abs=1e-12)
    # both spend the same candidate work; grouping only changes how many passes carry it
    assert together.block_forwards == alone.block_forwards


def hybrid_cfg():
    return Mamba2Config.preset("tiny").replace(chunk_size=16, n_layer=3, attn_layer_idx=(1,),
                                               attn_cfg={"num_heads": 4, "rotary_emb_dim": 16},
                                               d_intermediate=160, tie_embeddings=False)


def test_hybrid_untied_model_units_and_cache():
    cfg = hybrid_cfg()
    model = build_model(cfg, seed=3).eval()
    w = windows(cfg, n=2, length=25)
    res = run_local(model, w, acfg(("int8", "bin")))
    kinds = {r["kind"] for r in res.rows}
    assert kinds == {"embedding", "lm_head", "in_proj", "out_proj", "attn_in", "attn_out", "fc1", "fc2"}
    for unit, spec in [("backbone.layers.1.mixer.in_proj", "bin"), ("backbone.layers.1.mlp.fc2", "bin"),
                       ("lm_head", "int8"), ("backbone.embedding", "int8")]:
        ref = full_forward_metrics(model, w, {unit: parse_spec(spec)})
        got = row_of(res.rows, unit, spec)
        for m in LOGIT_METRICS:
            assert got[m] == pytest.approx(ref[m], rel=1e-6, abs=1e-12), (unit, spec, m)
    # an untied lm_head only runs the head from the cache
    jobs, _ = plan_jobs(model, acfg(("int8",)))
    (head_job,) = [j for j in jobs if j.id == "unit:lm_head"]
    assert head_job.start == cfg.n_layer


def test_resume_after_interruption_matches_uninterrupted(tiny_model, tiny_cfg, tmp_path, monkeypatch):
    w = windows(tiny_cfg)
    cfg = acfg()
    want = run_local(tiny_model, w, cfg)
    store = PartialStore(tmp_path / "partial", {"run": 1})
    store.prepare()
    real, calls = A.evaluate_job, {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(A, "evaluate_job", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_local(tiny_model, w, cfg, store=store)
    monkeypatch.setattr(A, "evaluate_job", real)
    assert len(store.load()) == 3
    got = run_local(tiny_model, w, cfg, store=PartialStore(tmp_path / "partial", {"run": 1}))
    assert got.resumed_jobs == 3
    assert got.rows == want.rows and got.block_rows == want.block_rows
    # partial results of another run are refused, not mixed in
    with pytest.raises(DfplanError, match="different sensitivity run"):
        PartialStore(tmp_path / "partial", {"run": 2}).prepare()
    assert PartialStore(tmp_path / "partial", {"run": 2}).prepare(restart=True) == 0


def test_bad_candidates_and_units(tiny_model, tiny_cfg):
    with pytest.raises(DfplanError, match="unknown format"):
        parse_candidates("int4,foo9")
    assert parse_candidates("default") == DEFAULT_CANDIDATES
    assert parse_candidates("bin, int4 ,bin") == specs("bin", "int4")
    # a known format no weight of this model can take (group 96 divides neither 128 nor 256)
    with pytest.raises(DfplanError, match="fit no unit"):
        plan_jobs(tiny_model, acfg(("int4", "int4g96")))
    with pytest.raises(DfplanError, match="matches no compressible unit"):
        plan_jobs(tiny_model, acfg(units=("backbone.layers.9.*",)))
    jobs, _ = plan_jobs(tiny_model, acfg(units=("*.out_proj",)))
    assert {j.id for j in jobs if j.kind == "unit"} == {f"unit:backbone.layers.{i}.mixer.out_proj"
                                                        for i in range(tiny_cfg.n_layer)}


class _Packed(nn.Module):
    """Stands in for an already-compressed linear: int8 codes, no float weight."""

    def __init__(self, lin):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(lin.weight.shape, dtype=torch.int8))


def test_model_without_compressible_units(tiny_cfg):
    model = build_model(tiny_cfg, seed=0)
    for blk in model.backbone.layers:
        blk.mixer.in_proj = _Packed(blk.mixer.in_proj)
        blk.mixer.out_proj = _Packed(blk.mixer.out_proj)
    model.backbone.embedding.weight = nn.Parameter(model.backbone.embedding.weight.detach().to(torch.int8),
                                                   requires_grad=False)
    with pytest.raises(DfplanError, match="no compressible float units"):
        run_local(model, windows(tiny_cfg), acfg())


def test_bad_windows(tiny_model, tiny_cfg):
    with pytest.raises(DfplanError, match="calibration windows"):
        run_local(tiny_model, np.zeros((3,), dtype=np.int64), acfg())
    with pytest.raises(DfplanError, match="vocabulary"):
        run_local(tiny_model, np.full((2, 9), tiny_cfg.vocab_padded + 5), acfg())
