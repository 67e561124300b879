"""Planner core: budgets, exact bytes of the space, the MILP against brute force, the surrogate
(table validation, correction), uniform baselines and the size-only prior."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from test_planner_fixtures import brute_force, hybrid_cfg, micro_cfg, synth_rows, write_table

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.size import plan_bytes
from dfplan.formats.specs import Binary, IntN
from dfplan.planner.milp import pareto_front, solve
from dfplan.planner.prior import NOTE, prior_surrogate
from dfplan.planner.space import build_space
from dfplan.planner.surrogate import Correction, fit_correction, load_surrogate, surrogate_from_table, tracking
from dfplan.planner.uniform import uniform_allocations
from dfplan.sizes import format_bytes, parse_bytes


def _space(cfg, seed=0):
    import pandas as pd
    sur = surrogate_from_table(pd.DataFrame(synth_rows(cfg, seed)), cfg)
    return build_space(cfg, sur.candidates()), sur


# -- budgets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("300MB", 300_000_000), ("278MiB", 278 * 2**20), ("2.5GB", 2_500_000_000), ("12345", 12345),
    (12345, 12345), ("1.5 kB", 1500), ("1GiB", 2**30), ("300mb", 300_000_000), ("1e6", 1_000_000),
    ("1,000,000", 1_000_000), ("1.3MiB", int(1.3 * 2**20)), ("7B", 7)])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["abc", "-5MB", "0", "0MB", "", "5XB", "nan", "MB", "1.2.3MB", "0.1",
                                  "-1", True, "inf"])
def test_parse_bytes_rejects(text):
    with pytest.raises(DfplanError):
        parse_bytes(text)


def test_format_bytes_shows_exact():
    assert format_bytes(278_000_000) == "278.00 MB (278,000,000 bytes)"


# -- the space's bytes are the size accounting's bytes --------------------------------------------

@pytest.mark.parametrize("cfg_fn", [micro_cfg, hybrid_cfg, lambda: Mamba2Config.preset("tiny")])
def test_space_bytes_equal_plan_bytes(cfg_fn):
    cfg = cfg_fn()
    space, _ = _space(cfg)
    kinds = {u.unit.kind for u in space.units}
    rng = np.random.default_rng(1)
    for _ in range(20):
        idx = [int(rng.integers(len(u.specs))) for u in space.units]
        a = space.assignment(idx)
        plan = space.to_plan(a)
        assert plan.predicted_bytes == space.total_bytes(a) == plan_bytes(cfg, plan).total_bytes
    assert space.min_bytes < space.max_bytes
    if cfg.name == "hybrid":
        assert kinds == {"embedding", "in_proj", "out_proj", "attn_in", "attn_out", "fc1", "fc2", "lm_head"}


def test_embedding_never_gets_binary_or_groups():
    space, _ = _space(hybrid_cfg())
    for u in space.units:
        if u.unit.kind in ("embedding", "lm_head"):
            assert not any(isinstance(s, Binary) or (isinstance(s, IntN) and s.group) for s in u.specs)
        else:
            assert any(isinstance(s, Binary) for s in u.specs)


def test_budget_below_minimum_message():
    cfg = micro_cfg()
    space, sur = _space(cfg)
    with pytest.raises(DfplanError, match=r"budget .* is below the minimum .* for this model") as e:
        solve(space, sur, space.min_bytes - 1)
    assert f"{space.min_bytes:,}" in str(e.value)
    assert solve(space, sur, space.min_bytes).total_bytes == space.min_bytes


# -- the exact solver -----------------------------------------------------------------------------

def test_milp_matches_brute_force():
    cfg = micro_cfg()
    space, sur = _space(cfg, seed=3)
    rng = np.random.default_rng(0)
    budgets = [space.min_bytes, space.max_bytes] + [int(b) for b in rng.integers(space.min_bytes, space.max_bytes, 8)]
    for b in budgets:
        r = solve(space, sur, b)
        best_kl, _ = brute_force(space, sur, b)
        assert r.total_bytes <= b
        assert r.total_bytes == plan_bytes(cfg, space.to_plan(r.assignment)).total_bytes
        assert r.additive_kl == pytest.approx(best_kl, rel=1e-9, abs=1e-12)
        assert r.status == "optimal" and r.dual_bound <= r.additive_kl * (1 + 1e-9) + 1e-12


def test_milp_never_exceeds_budget_and_beats_uniform():
    cfg = Mamba2Config.preset("tiny")
    space, sur = _space(cfg, seed=5)
    uni = uniform_allocations(space, sur)
    assert {u.spec for u in uni} >= {"bin", "bin+r16", "int4", "int2", "fp16"}
    for u in uni:
        r = solve(space, sur, u.total_bytes)
        assert r.total_bytes <= u.total_bytes
        assert r.additive_kl <= u.additive_kl + 1e-12
    for b in np.linspace(space.min_bytes, space.max_bytes, 7).astype(int):
        assert solve(space, sur, int(b)).total_bytes <= b


def test_identical_units_are_grouped_and_still_exact():
    """Under the prior every layer is identical; the grouped MILP must still be optimal."""
    cfg = micro_cfg(n_layer=2)
    sur = prior_surrogate(cfg)
    space = build_space(cfg, sur.candidates())
    for b in np.linspace(space.min_bytes, space.max_bytes, 6).astype(int):
        r = solve(space, sur, int(b))
        assert r.additive_kl == pytest.approx(brute_force(space, sur, int(b))[0], rel=1e-9, abs=1e-12)


def test_pareto_front_monotone():
    space, sur = _space(Mamba2Config.preset("tiny"), seed=2)
    front = pareto_front(space, sur, n_points=10)
    assert len(front) >= 3
    b = [p.total_bytes for p in front]
    k = [p.additive_kl for p in front]
    assert b == sorted(b) and all(x > y for x, y in zip(k, k[1:]))
    assert front[0].total_bytes >= space.min_bytes and front[-1].total_bytes <= space.max_bytes


# -- sensitivity tables ---------------------------------------------------------------------------

def test_table_loads_and_averages_seeds(tmp_path):
    cfg = micro_cfg()
    rows = synth_rows(cfg, n_seeds=2)
    p = write_table(cfg, tmp_path / "sensitivity.csv", rows=rows)
    sur = load_surrogate(p, cfg)
    r0 = [r for r in rows if r["unit"] == "backbone.layers.0.mixer.in_proj" and r["spec"] == "int4"]
    assert len(r0) == 2
    assert sur.unit_kl("backbone.layers.0.mixer.in_proj", "int4") == pytest.approx(np.mean([r["kl"] for r in r0]))
    assert sur.provenance["table_sha256"] and sur.source == "sensitivity"


def test_table_from_other_model_is_refused(tmp_path):
    cfg = micro_cfg()
    # more layers: units the model lacks
    p = write_table(micro_cfg(n_layer=3), tmp_path / "a" / "sensitivity.csv", provenance={})
    with pytest.raises(DfplanError, match="does not match model .*lacks"):
        load_surrogate(p, cfg)
    # same names, other width: bytes disagree with the shapes
    other = micro_cfg(d_model=96)
    p = write_table(other, tmp_path / "b" / "sensitivity.csv", provenance={})
    with pytest.raises(DfplanError, match="bytes in the table"):
        load_surrogate(p, cfg)
    # the provenance records another model
    p = write_table(other, tmp_path / "c" / "sensitivity.csv")
    with pytest.raises(DfplanError, match="measured on another model"):
        load_surrogate(p, cfg)
    # ... but not when it records the padded vocabulary of this model (transformers layout)
    from dfplan.planner.surrogate import check_provenance
    padded = -(-cfg.vocab_size // cfg.pad_vocab_size_multiple) * cfg.pad_vocab_size_multiple
    assert padded != cfg.vocab_size
    check_provenance({"model_config": {"d_model": cfg.d_model, "vocab_size": padded}}, cfg, "t")
    with pytest.raises(DfplanError, match="vocab_size"):
        check_provenance({"model_config": {"vocab_size": padded + cfg.pad_vocab_size_multiple}}, cfg, "t")
    # a table missing units
    rows = [r for r in synth_rows(cfg) if r["unit"] != "backbone.embedding"]
    p = write_table(cfg, tmp_path / "d" / "sensitivity.csv", rows=rows)
    with pytest.raises(DfplanError, match="no rows for 1 of the model's units"):
        load_surrogate(p, cfg)


def test_table_bad_files(tmp_path):
    cfg = micro_cfg()
    with pytest.raises(DfplanError, match="does not exist"):
        load_surrogate(tmp_path / "none.csv", cfg)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DfplanError, match="not a sensitivity table"):
        load_surrogate(bad, cfg)
    rows = synth_rows(cfg)
    rows[0]["spec"] = "int5"
    p = write_table(cfg, tmp_path / "e" / "sensitivity.csv", rows=rows)
    with pytest.raises(DfplanError, match="int5"):
        load_surrogate(p, cfg)


# -- correction and tracking ----------------------------------------------------------------------

def test_fit_correction_recovers_scale_and_power():
    rng = np.random.default_rng(0)
    a = rng.uniform(0.01, 2.0, 30)
    m = 2.5 * a ** 1.3
    c = fit_correction(a, m)
    assert c.scale == pytest.approx(2.5, rel=1e-6) and c.power == pytest.approx(1.3, rel=1e-6)
    t = tracking(a, m, c)
    assert t.spearman == pytest.approx(1.0) and t.median_rel_err < 1e-6 < t.raw_median_rel_err
    # two plans: scale only
    c2 = fit_correction([1.0, 2.0], [3.0, 6.0])
    assert c2.power == 1.0 and c2.scale == pytest.approx(3.0)
    assert fit_correction([], []) == Correction()


def test_correction_never_tracks_worse_than_the_sum():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = np.exp(rng.uniform(-12, 0, 15))
        m = a * np.exp(rng.normal(0, 0.8, 15)) * rng.choice([0.5, 1, 3])
        t = tracking(a, m, fit_correction(a, m))
        assert t.median_rel_err <= t.raw_median_rel_err + 1e-12


def test_correction_keeps_milp_choice():
    space, sur = _space(micro_cfg(), seed=4)
    b = (space.min_bytes + space.max_bytes) // 3
    r1 = solve(space, sur, b)
    r2 = solve(space, sur.with_correction(Correction(3.0, 1.4)), b)
    assert r1.assignment == r2.assignment
    assert r2.predicted_kl == pytest.approx(3.0 * r1.additive_kl ** 1.4)


# -- size-only prior ------------------------------------------------------------------------------

def test_prior_gives_dfssm_layout_on_1_3b():
    cfg = Mamba2Config.preset("mamba2-1.3b")
    sur = prior_surrogate(cfg)
    space = build_space(cfg, sur.candidates())
    r = solve(space, sur, parse_bytes("278MB"))
    plan = space.to_plan(r.assignment, notes=NOTE)
    assert plan_bytes(cfg, plan).total_bytes == r.total_bytes <= 278_000_000
    assert r.assignment["backbone.embedding"].name == "int8"
    lin = [s for n, s in r.assignment.items() if n != "backbone.embedding"]
    assert all(isinstance(s, Binary) and s.scale == "row" for s in lin)
    mean_rank = sum(s.rank for s in lin) / len(lin)
    assert 16 <= mean_rank <= 20
    ranks = Counter(s.rank for s in lin)
    assert set(ranks) <= {8, 16, 32}            # spread evenly, not a few big corrections
    assert "no quality claim" in plan.notes


def test_prior_prefers_more_rank_with_diminishing_returns():
    from dfplan.formats.units import compressible_units
    from dfplan.planner.prior import nominal_error
    u = compressible_units(Mamba2Config.preset("mamba2-1.3b"))[1]
    errs = [nominal_error(Binary("row", r), u.shape) for r in (0, 8, 16, 32, 64, 128)]
    gains = [a - b for a, b in zip(errs, errs[1:])]
    assert all(g > 0 for g in gains)
    per_rank = [g / d for g, d in zip(gains, (8, 8, 16, 32, 64))]
    assert all(x > y for x, y in zip(per_rank, per_rank[1:]))
