"""Optuna search (budget constraint, warm start, resume, corrupt storage), the measured
objective, and `dfplan search` end to end with its bad-input errors."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_planner_fixtures import micro_cfg, synth_rows, write_model_dir, write_table

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.plan import Plan
from dfplan.formats.size import plan_bytes
from dfplan.planner.milp import solve
from dfplan.planner.optuna_search import run_search, study_name
from dfplan.planner.space import build_space
from dfplan.planner.surrogate import surrogate_from_table
from dfplan.planner.uniform import uniform_allocations


@pytest.fixture
def problem():
    cfg = micro_cfg()
    sur = surrogate_from_table(pd.DataFrame(synth_rows(cfg, 7)), cfg)
    space = build_space(cfg, sur.candidates())
    budget = space.min_bytes + (space.max_bytes - space.min_bytes) // 4
    return cfg, space, sur, budget


def _db(tmp_path):
    return f"sqlite:///{tmp_path / 'study.db'}"


# -- Optuna -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_optuna_respects_budget_and_never_beats_milp(problem, tmp_path, sampler):
    cfg, space, sur, budget = problem
    milp = solve(space, sur, budget)
    res = run_search(space, sur, budget, sampler=sampler, n_trials=25, storage=_db(tmp_path),
                     warm_starts=[milp.assignment], progress=False)
    assert res.n_trials == 25
    feas = [t for t in res.trials if t.feasible]
    assert res.trials[0].assignment == {k: v.name for k, v in milp.assignment.items()}   # warm start first
    assert any(not t.feasible for t in res.trials)          # the constraint was actually exercised
    for t in res.trials:
        assert t.total_bytes == space.total_bytes(t.assignment)
        assert t.feasible == (t.total_bytes <= budget)
    assert res.best is not None and res.best.total_bytes <= budget
    assert all(milp.additive_kl <= t.value + 1e-12 for t in feas)
    for u in uniform_allocations(space, sur, budget):
        assert milp.additive_kl <= u.additive_kl + 1e-12


def test_optuna_without_warm_start_stays_feasible_and_above_milp(problem, tmp_path):
    cfg, space, sur, budget = problem
    milp = solve(space, sur, budget)
    res = run_search(space, sur, budget, sampler="tpe", n_trials=30, storage=_db(tmp_path), progress=False)
    if res.best is not None:
        assert res.best.total_bytes <= budget and res.best.value >= milp.additive_kl - 1e-12


def test_interrupted_study_resumes(problem, tmp_path):
    cfg, space, sur, budget = problem
    milp = solve(space, sur, budget)
    kw = dict(sampler="tpe", storage=_db(tmp_path), warm_starts=[milp.assignment], progress=False)
    first = run_search(space, sur, budget, n_trials=8, **kw)
    assert first.n_new == 8
    again = run_search(space, sur, budget, n_trials=8, **kw)      # nothing left to do
    assert again.n_new == 0 and again.n_trials == 8
    more = run_search(space, sur, budget, n_trials=14, **kw)
    assert more.n_new == 6 and more.n_trials == 14 and more.study_name == first.study_name
    before = {t.number: (t.assignment, t.value) for t in first.trials}
    after = {t.number: (t.assignment, t.value) for t in more.trials}
    assert all(after[n] == v for n, v in before.items())
    # the warm start was not enqueued twice
    key = tuple(sorted(before[0][0].items()))
    assert sum(tuple(sorted(a.items())) == key for a, _ in after.values()) == 1


def test_study_name_depends_on_problem(problem):
    cfg, space, sur, budget = problem
    n = study_name(space, sur, budget, "tpe", "predicted")
    assert n == study_name(space, sur, budget, "tpe", "predicted")
    assert n != study_name(space, sur, budget + 1, "tpe", "predicted")
    assert n != study_name(space, sur, budget, "nsga2", "predicted")


def test_corrupt_study_database(problem, tmp_path):
    cfg, space, sur, budget = problem
    (tmp_path / "study.db").write_bytes(b"this is not an sqlite database" * 100)
    with pytest.raises(DfplanError, match="study"):
        run_search(space, sur, budget, sampler="tpe", n_trials=3, storage=_db(tmp_path), progress=False)


# -- measured objective -------------------------------------------------------------------------

@pytest.fixture
def tiny_teacher():
    from dfplan.model import build_model
    cfg = micro_cfg()
    torch.manual_seed(0)
    return build_model(cfg, seed=0).eval()


def test_measured_kl_matches_evaluate(tiny_teacher):
    from dfplan.evaluate import kl_to_teacher
    from dfplan.formats.apply import apply_plan
    from dfplan.planner.measured import MeasuredKL

    cfg = tiny_teacher.config
    sur = surrogate_from_table(pd.DataFrame(synth_rows(cfg)), cfg)
    space = build_space(cfg, sur.candidates())
    windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 17))
    ev = MeasuredKL(tiny_teacher, windows, space, batch_size=2)
    a = {u.unit.name: ("bin+r8" if "bin+r8" in u.names else "int4") for u in space.units}
    got = ev(a)
    student = apply_plan(copy.deepcopy(tiny_teacher), space.to_plan(a), generator=torch.Generator().manual_seed(0))
    want = kl_to_teacher(tiny_teacher, student, windows, batch_size=2, vocab_size=cfg.vocab_size)
    assert got == pytest.approx(want, rel=1e-5) and got > 0
    assert ev({u.unit.name: "fp16" for u in space.units}) < got


def test_measured_search_scores_true_kl(tiny_teacher, tmp_path):
    from dfplan.planner.measured import MeasuredKL
    from dfplan.planner.surrogate import fit_correction

    cfg = tiny_teacher.config
    sur = surrogate_from_table(pd.DataFrame(synth_rows(cfg)), cfg)
    space = build_space(cfg, sur.candidates())
    budget = space.min_bytes + (space.max_bytes - space.min_bytes) // 5
    windows = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 17))
    ev = MeasuredKL(tiny_teacher, windows, space)
    milp = solve(space, sur, budget)
    res = run_search(space, sur, budget, sampler="tpe", n_trials=6, storage=_db(tmp_path), objective="measured",
                     evaluator=ev, warm_starts=[milp.assignment], progress=False)
    feas = [t for t in res.trials if t.feasible]
    assert feas and all(t.measured for t in feas) and not any(t.measured for t in res.trials if not t.feasible)
    assert ev.calls == len({tuple(sorted(t.assignment.items())) for t in feas})
    assert res.trials[0].value == pytest.approx(ev(milp.assignment))
    c = fit_correction([t.additive_kl for t in feas], [t.value for t in feas])
    assert c.scale > 0


# -- the command ---------------------------------------------------------------------------------

def _run(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_cli_end_to_end(tmp_path, capsys):
    cfg = micro_cfg()
    model = write_model_dir(cfg, tmp_path / "teacher")
    out = tmp_path / "run"
    write_table(cfg, out / "sensitivity.csv", seed=2)
    space = build_space(cfg)
    budget = space.min_bytes + (space.max_bytes - space.min_bytes) // 3
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", str(budget), "--out", str(out),
                    "--solver", "all", "--trials", "12")
    assert rc == 0, text
    plan = Plan.from_json(out / "plan.json")
    assert plan.predicted_bytes == plan_bytes(cfg, plan).total_bytes <= budget == plan.budget_bytes
    assert plan.solver == "milp" and plan.predicted_kl is not None
    prov = plan.provenance
    assert prov["milp"]["status"] == "optimal" and set(prov["optuna"]) == {"tpe", "nsga2"}
    assert all(r["best"]["kl"] >= plan.predicted_kl - 1e-12 for r in prov["optuna"].values())
    assert (out / "plan.md").read_text().startswith("# Plan for teacher")
    assert (out / "pareto.csv").read_text().startswith("budget,bytes")
    assert (out / "study.db").is_file()
    rc, text = _run(capsys, "size", "--model", str(model), "--plan", str(out / "plan.json"), "--json")
    assert rc == 0 and json.loads(text)["total_bytes"] == plan.predicted_bytes


def test_cli_prior_for_random_init_preset(tmp_path, capsys):
    out = tmp_path / "run"
    rc, text = _run(capsys, "search", "--model", "preset:tiny", "--random-init", "--budget", "0.5MB",
                    "--out", str(out))
    assert rc == 0, text
    plan = Plan.from_json(out / "plan.json")
    assert "size-only prior: no quality claim" in plan.notes and plan.provenance["scores"] == "prior"
    cfg = Mamba2Config.preset("tiny")
    assert plan.predicted_bytes == plan_bytes(cfg, plan).total_bytes <= 500_000


@pytest.mark.parametrize("budget,msg", [("lots", "cannot parse budget"), ("0", "positive"),
                                        ("-3MB", "positive"), ("1kB", "is below the minimum")])
def test_cli_bad_budget_writes_nothing(tmp_path, capsys, budget, msg):
    cfg = micro_cfg()
    model = write_model_dir(cfg, tmp_path / "teacher")
    out = tmp_path / "run"
    write_table(cfg, out / "sensitivity.csv")
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", budget, "--out", str(out))
    assert rc == 2 and "error:" in text and msg in text
    assert not (out / "plan.json").exists()


def test_cli_mismatched_table_and_corrupt_study(tmp_path, capsys):
    cfg = micro_cfg()
    model = write_model_dir(cfg, tmp_path / "teacher")
    out = tmp_path / "run"
    write_table(micro_cfg(n_layer=3), out / "sensitivity.csv")
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(out))
    assert rc == 2 and "measured on another model" in text and not (out / "plan.json").exists()

    write_table(cfg, out / "sensitivity.csv")
    (out / "study.db").write_bytes(b"\x00garbage" * 512)
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(out),
                    "--solver", "tpe", "--trials", "3")
    assert rc == 2 and "study" in text and not (out / "plan.json").exists()


def test_cli_missing_table_and_measured_without_corpus(tmp_path, capsys):
    cfg = micro_cfg()
    model = write_model_dir(cfg, tmp_path / "teacher")
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(tmp_path / "r"))
    assert rc == 2 and "dfplan sensitivity" in text
    rc, text = _run(capsys, "search", "--model", "preset:tiny", "--budget", "10MB", "--out", str(tmp_path / "r"))
    assert rc == 2 and "--random-init" in text
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(tmp_path / "r"),
                    "--objective", "measured", "--prior")
    assert rc == 2 and "--corpus" in text
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(tmp_path / "r"),
                    "--prior", "--sensitivity", str(tmp_path / "t.csv"))
    assert rc == 2 and "not both" in text
    rc, text = _run(capsys, "search", "--model", str(model), "--budget", "10MB", "--out", str(tmp_path / "r"),
                    "--prior", "--solver", "tpe", "--storage", "nosuchdb://x")
    assert rc == 2 and "storage" in text
    assert not (tmp_path / "r" / "plan.json").exists()


def test_study_interrupted_mid_trial_resumes(problem, tmp_path):
    """Ctrl-C inside a trial: finished trials survive, a rerun completes the study."""
    cfg, space, sur, budget = problem
    calls = {"n": 0}

    def flaky(assignment):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return 2.0 * sur.additive(assignment)

    kw = dict(sampler="tpe", storage=_db(tmp_path), objective="measured", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_search(space, sur, budget, n_trials=12, evaluator=flaky, **kw)
    done = run_search(space, sur, budget, n_trials=0, evaluator=flaky, **kw)
    assert 4 <= done.n_trials < 12
    first = {t.number: (t.assignment, t.value) for t in done.trials}
    res = run_search(space, sur, budget, n_trials=12, evaluator=lambda a: 2.0 * sur.additive(a), **kw)
    assert res.n_trials == 12 and res.n_new == 12 - done.n_trials
    assert all({t.number: (t.assignment, t.value) for t in res.trials}[n] == v for n, v in first.items())


def test_cli_measured_objective_and_validation(tmp_path, capsys):
    """A real (random-weight) checkpoint with a tokenizer: measured trials and --validate."""
    from dfplan.loading import save_mamba_ssm
    from dfplan.model import build_model
    from dfplan.tokenizer import train_bpe

    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "scan", "token", "layer", "bit", "rank", "budget", "plan"]
    text = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(400))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    tok = train_bpe([text], vocab_size=300)
    cfg = micro_cfg()
    torch.manual_seed(0)
    model_dir = save_mamba_ssm(build_model(cfg, seed=0), tmp_path / "teacher", tokenizer=tok)
    out = tmp_path / "run"
    write_table(cfg, out / "sensitivity.csv", seed=1)
    space = build_space(cfg)
    budget = space.min_bytes + (space.max_bytes - space.min_bytes) // 5
    rc, text_out = _run(capsys, "search", "--model", str(model_dir), "--budget", str(budget), "--out", str(out),
                        "--solver", "tpe", "--trials", "5", "--objective", "measured", "--corpus", str(corpus),
                        "--seq-len", "16", "--heldout-windows", "2", "--validate", "3")
    assert rc == 0, text_out
    plan = Plan.from_json(out / "plan.json")
    prov = plan.provenance
    assert plan.predicted_bytes <= budget and prov["measured_kl"] > 0
    assert prov["optuna"]["tpe"]["best"]["measured"] and prov["measured"]["windows"] == 2
    assert len(prov["validation"]) >= 2 and prov["correction"]["tracking"]["n"] >= 3
    assert "## Surrogate vs measured" in (out / "plan.md").read_text()
