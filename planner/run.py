"""`dfplan search` as a library call: scores -> space -> exact MILP (+ Optuna) -> run/plan.json.

Steps, each refusing bad input before anything is written:
  1. the model's config (no weights unless --objective measured);
  2. per-unit KL: the sensitivity table (validated against the model), or the size-only
     prior for a preset with --random-init (or --prior);
  3. the space (candidates x exact bytes) and the budget check against the smallest model;
  4. the MILP optimum at the budget (always: it is the certificate and the warm start), the
     Pareto front by sweeping budgets, uniform allocations for comparison;
  5. Optuna (TPE / NSGA-II) when asked, resuming its study in the run directory;
  6. the chosen plan: the MILP optimum for the predicted objective (Optuna can only tie it),
     the best measured feasible trial for the measured objective;
  7. the SSM state precision (planner/statedtype.py): fixed, or measured on the model (auto);
  8. plan.json (atomic), plan.md, pareto.csv.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dfplan.data import heldout_windows, load_tokens
from dfplan.errors import DfplanError
from dfplan.fileio import write_text_atomic
from dfplan.formats.plan import Plan
from dfplan.loading import load_config, load_model
from dfplan.provenance import git_commit, library_versions
from dfplan.sizes import format_bytes, parse_bytes
from dfplan.tokenizer import check_vocab, load_tokenizer

from .measured import MeasuredKL
from .milp import pareto_front, solve
from .optuna_search import SAMPLERS, redact_url, run_search
from .prior import NOTE as PRIOR_NOTE
from .prior import prior_surrogate
from .space import build_space
from .statedtype import DEFAULT_KL_MAX, check_state_options, choose_state_dtype
from .summary import render_summary, write_front_csv
from .surrogate import fit_correction, load_surrogate, tracking
from .uniform import uniform_allocations

SOLVERS = ("milp", "tpe", "nsga2", "all")


@dataclass(frozen=True)
class SearchOptions:
    model: str
    budget: str | int
    out: str
    sensitivity: str | None = None
    solver: str = "milp"
    trials: int = 200
    objective: str = "predicted"
    storage: str | None = None
    corpus: tuple = ()
    tokenizer: str | None = None
    random_init: bool = False
    prior: bool = False
    seed: int = 0
    front_points: int = 24
    heldout_windows: int = 16
    seq_len: int | None = None
    batch_size: int = 8
    validate: int = 0
    time_limit: float = 120.0
    progress: bool = True
    argv: tuple = field(default_factory=tuple)
    state_dtype: str = "fp32"           # fp32 | bf16 | fp16 | auto (measured on the model)
    state_kl_max: float = DEFAULT_KL_MAX
    state_tokens: int = 512
    state_prompt_len: int = 64


def _validate(o: SearchOptions) -> int:
    budget = parse_bytes(o.budget)
    if o.solver not in SOLVERS:
        raise DfplanError(f"unknown --solver {o.solver!r}; choose one of {', '.join(SOLVERS)}")
    if o.objective not in ("predicted", "measured"):
        raise DfplanError(f"unknown --objective {o.objective!r}; choose predicted or measured")
    if o.trials < 0:
        raise DfplanError(f"--trials must be >= 0, got {o.trials}")
    if o.validate < 0:
        raise DfplanError(f"--validate must be >= 0, got {o.validate}")
    check_state_options(o.state_dtype, o.state_kl_max, o.state_tokens, o.state_prompt_len)
    for flag, on in (("--objective measured", o.objective == "measured"), ("--validate", o.validate > 0)):
        if on and o.random_init:
            raise DfplanError(f"{flag} needs trained weights; drop --random-init")
        if on and not o.corpus:
            raise DfplanError(f"{flag} needs --corpus (held-out text to measure KL on)")
    return budget


def _scores(o: SearchOptions, cfg, out: Path):
    """-> Surrogate, from the table or the prior."""
    if o.prior and o.sensitivity:
        raise DfplanError("pass either --prior (size-only scores) or --sensitivity TABLE, not both")
    if o.prior or (o.random_init and o.sensitivity is None):
        return prior_surrogate(cfg)
    table = Path(o.sensitivity) if o.sensitivity else out / "sensitivity.csv"
    if not table.is_file():
        if o.sensitivity is None and o.model.startswith("preset:"):
            raise DfplanError(f"{o.model} has no weights and {table} does not exist: add --random-init "
                              f"to plan with the size-only prior, or pass --sensitivity TABLE")
        raise DfplanError(f"sensitivity table {table} does not exist; run `dfplan sensitivity --model "
                          f"{o.model} --corpus C --out {table}` first, pass --sensitivity PATH, or --prior "
                          f"for the size-only prior (no quality claim)")
    return load_surrogate(table, cfg)


def measured_evaluator(o: SearchOptions, cfg, space, sur):
    model, tok = load_model(o.model)
    model = model.float()
    if o.tokenizer:
        tok = load_tokenizer(o.tokenizer)
    if tok is None:
        raise DfplanError(f"{o.model} has no tokenizer.json; pass --tokenizer for --objective measured")
    check_vocab(tok, model.config)
    stream = load_tokens(list(o.corpus), tok)
    # the analyzer's split seed keeps these windows out of its calibration windows
    calib = sur.provenance.get("calibration") or {}
    seed = int(calib["seed"]) if isinstance(calib.get("seed"), int) else o.seed
    seq_len = o.seq_len or (int(calib["seq_len"]) if isinstance(calib.get("seq_len"), int) else 256)
    windows = heldout_windows(stream.tokens, seq_len, o.heldout_windows, seed)
    ev = MeasuredKL(model, windows, space, batch_size=o.batch_size)
    return ev, {"corpus": [str(f) for f in stream.files], "seq_len": seq_len, "windows": int(len(windows)),
                "split_seed": seed}


def _validate_plans(space, sur, evaluator, chosen, front, uniforms, k: int, say) -> list[dict]:
    """Measure the chosen plan plus up to k - 1 others, half from the MILP front and half
    uniform allocations, spread by bytes; -> rows with additive and measured KL."""
    def spread(items, n):
        if n <= 0 or not items:
            return []
        idx = np.unique(np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int))
        return [items[i] for i in idx]

    n_front = k // 2
    picks = [("chosen", chosen)]
    picks += [(f"front {p.total_bytes / 1e6:.3f} MB", p.assignment) for p in spread(front, n_front)]
    picks += [(f"uniform {u.name}", u.assignment) for u in spread(uniforms, k - 1 - n_front)]
    rows, seen = [], set()
    for label, a in picks:
        key = tuple(sorted((n, s if isinstance(s, str) else s.name) for n, s in a.items()))
        if key in seen:
            continue
        seen.add(key)
        m = float(evaluator(a))
        rows.append({"plan": label, "bytes": space.total_bytes(a), "additive_kl": sur.additive(a), "measured_kl": m})
        say(f"validate {label}: predicted {sur.additive(a):.6g}, measured {m:.6g}")
    return rows


def _run_samplers(o: SearchOptions, space, sur, budget: int, milp, front, uniforms, evaluator, storage: str,
                  say) -> dict:
    """Each requested Optuna sampler on its (resumable) study -> {sampler: result}."""
    runs = {}
    for s in [s for s in SAMPLERS if o.solver in (s, "all")]:
        # feasible starting points: random plans of a big model almost never fit a tight budget
        warm = ([milp.assignment] + [p.assignment for p in front if p.total_bytes <= budget][-8:]
                + [u.assignment for u in uniforms if u.total_bytes <= budget][-4:])
        try:
            res = run_search(space, sur, budget, sampler=s, n_trials=o.trials, storage=storage,
                             objective=o.objective, evaluator=evaluator, warm_starts=warm, seed=o.seed,
                             progress=o.progress)
        except KeyboardInterrupt:
            say(f"interrupted: the {s} study in {redact_url(storage)} keeps its finished trials; "
                f"rerun the same command to resume it")
            raise
        runs[s] = res
        b = res.best
        say(f"{s}: {res.n_trials} trials ({res.n_new} new, {res.seconds:.1f} s), best "
            + ("none feasible" if b is None else f"KL {b.value:.6g} at {format_bytes(b.total_bytes, False)}"))
    return runs


def _choose(o: SearchOptions, milp, runs: dict, evaluator) -> tuple[dict, str, float | None]:
    """The chosen plan and what produced it: a sampler only when it beat the MILP optimum
    -> (assignment, solver, measured KL or None)."""
    chosen, solver_used, chosen_kl_measured = milp.assignment, "milp", None
    milp_names = {k: v.name for k, v in milp.assignment.items()}
    if o.objective == "measured":
        bests = [(k, r.best) for k, r in runs.items() if r.best is not None and r.best.measured]
        if bests:
            k, b = min(bests, key=lambda kb: (kb[1].value, kb[1].total_bytes))
            chosen, chosen_kl_measured = dict(b.assignment), b.value
            solver_used = "milp" if b.assignment == milp_names else k
        else:   # solver milp only: measure the certified predicted optimum
            chosen_kl_measured = float(evaluator(milp.assignment))
    else:
        better = [(k, r.best) for k, r in runs.items() if r.best is not None and r.best.value < milp.predicted_kl]
        if better:
            solver_used, b = min(better, key=lambda kb: kb[1].value)
            chosen = dict(b.assignment)
    return chosen, solver_used, chosen_kl_measured


def _corrected(sur, runs: dict, validation: list) -> tuple:
    """The surrogate with a correction fitted on every measured plan we have -> (surrogate, info)."""
    measured_pts = [(t.additive_kl, t.value) for r in runs.values() for t in r.trials if t.measured]
    measured_pts += [(v["additive_kl"], v["measured_kl"]) for v in validation]
    if not measured_pts:
        return sur, None
    a, m = zip(*measured_pts)
    corr = fit_correction(a, m)
    return sur.with_correction(corr), {"correction": corr.to_dict(), "tracking": tracking(a, m, corr).to_dict()}


def search(o: SearchOptions, say=print) -> Plan:
    """Run the search described by `o`; writes OUT/plan.json, plan.md, pareto.csv; -> the Plan."""
    t0 = time.perf_counter()
    budget = _validate(o)
    out = Path(o.out)
    if out.exists() and not out.is_dir():
        raise DfplanError(f"--out {out} is a file; pass a run directory")
    cfg = load_config(o.model)
    sur = _scores(o, cfg, out)
    space = build_space(cfg, sur.candidates())
    space.check_budget(budget)
    say(f"{cfg.name}: {len(space.units)} units, {sum(len(u.specs) for u in space.units)} choices, "
        f"fixed {format_bytes(space.fixed_bytes)}; sizes {format_bytes(space.min_bytes, False)} .. "
        f"{format_bytes(space.max_bytes, False)}; budget {format_bytes(budget)}; scores: {sur.source}")

    evaluator, measured_info = None, {}
    if o.objective == "measured" or o.validate:
        evaluator, measured_info = measured_evaluator(o, cfg, space, sur)

    milp = solve(space, sur, budget, time_limit=o.time_limit)
    say(f"milp: {format_bytes(milp.total_bytes)}, predicted KL {milp.predicted_kl:.6g} "
        f"({milp.status}, gap {milp.gap:.2g}, {milp.seconds:.2f} s)")
    front = pareto_front(space, sur, n_points=o.front_points, time_limit=o.time_limit)
    uniforms = uniform_allocations(space, sur)

    storage = o.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    runs = _run_samplers(o, space, sur, budget, milp, front, uniforms, evaluator, storage, say)
    chosen, solver_used, chosen_kl_measured = _choose(o, milp, runs, evaluator)

    # plans measured to check the surrogate: front points and uniform allocations
    validation = []
    if o.validate:
        validation = _validate_plans(space, sur, evaluator, chosen, front, uniforms, o.validate, say)
        if chosen_kl_measured is None:
            chosen_kl_measured = validation[0]["measured_kl"]

    sur, corr_info = _corrected(sur, runs, validation)

    # one more axis, beside the weights: the SSM state precision (no weight bytes, no budget)
    state = choose_state_dtype(cfg, o.state_dtype, model_arg=o.model, random_init=o.random_init,
                               corpus=o.corpus, tokenizer=o.tokenizer, kl_max=o.state_kl_max,
                               tokens=o.state_tokens, prompt_len=o.state_prompt_len, seed=o.seed,
                               progress=o.progress, say=say)

    nbytes = space.total_bytes(chosen)
    assert nbytes <= budget
    notes = [f"{solver_used} plan for {format_bytes(budget)} on {cfg.name}, objective {o.objective} KL"]
    if runs and solver_used == "milp":
        notes.append(f"{' and '.join(runs)} found no plan better than the MILP optimum")
    if sur.source == "prior":
        notes.insert(0, PRIOR_NOTE)
    prov = {
        "command": "dfplan search", "argv": list(o.argv), "model": o.model, "budget": str(o.budget),
        "scores": sur.source, "scores_provenance": sur.provenance, "objective": o.objective,
        "solver_requested": o.solver,
        "milp": milp.to_dict(),
        "optuna": {k: r.summary() for k, r in runs.items()},
        "storage": redact_url(storage) if runs else None,
        "correction": corr_info, "measured": measured_info or None, "validation": validation or None,
        "measured_kl": chosen_kl_measured,
        "space": {"units": len(space.units), "choices": sum(len(u.specs) for u in space.units),
                  "fixed_bytes": space.fixed_bytes, "min_bytes": space.min_bytes, "max_bytes": space.max_bytes},
        "uniform": [{"name": u.name, "bytes": u.total_bytes, "predicted_kl": u.predicted_kl} for u in uniforms],
        "state": state["provenance"],
        "git_commit": git_commit(), "versions": library_versions("optuna", "scipy"), "seed": o.seed,
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    plan = space.to_plan(chosen, budget_bytes=budget, predicted_kl=float(sur.predict(chosen)),
                         solver=solver_used, notes="; ".join(notes), provenance=prov)
    plan = plan.with_(state_dtype=state["state_dtype"], state_kl=state["state_kl"],
                      state_bytes_per_token=state["state_bytes_per_token"])
    out.mkdir(parents=True, exist_ok=True)
    plan.to_json(out / "plan.json")
    write_front_csv(out / "pareto.csv", front, sur)
    write_text_atomic(out / "plan.md", render_summary(plan, space, sur, milp, front, uniforms, runs, budget,
                                                      evaluator_info=measured_info))
    say(f"wrote {out / 'plan.json'}: {format_bytes(nbytes)}, predicted KL {plan.predicted_kl:.6g}"
        + (f", measured KL {chosen_kl_measured:.6g}" if chosen_kl_measured is not None else "")
        + f", SSM state {plan.state_dtype}")
    return plan
