"""Planner benchmark: is the KL-guided plan better than uniform allocations at equal bytes,
how close does Optuna get to the exact optimum, and what does each cost in wall time.

    dfplan bench planner --model runs/teacher --sensitivity runs/x/sensitivity.csv \\
        --corpus builtin --out runs/x/planner_bench

For every uniform allocation (all bin+rR, all int4, all int2, ...; embedding int8) the MILP is
solved at exactly the uniform plan's bytes and both plans are measured: KL(teacher || plan) on
held-out windows (the valid split, disjoint from the sensitivity calibration). Then TPE and
NSGA-II run N trials on the predicted objective at one budget (fresh in-memory studies, so
timings exclude a database), with and without the MILP warm start, and are compared with the MILP optimum. Writes bench.json and
bench.md into --out.
"""
from __future__ import annotations

import time
from pathlib import Path

from dfplan.fileio import write_json_atomic, write_text_atomic
from dfplan.loading import load_config
from dfplan.planner.milp import pareto_front, solve
from dfplan.planner.optuna_search import run_search
from dfplan.planner.run import SearchOptions, measured_evaluator
from dfplan.planner.space import build_space
from dfplan.planner.surrogate import fit_correction, load_surrogate, tracking
from dfplan.planner.uniform import uniform_allocations


def run_benchmark(model: str, sensitivity: str, corpus: list[str], out: str, trials: int = 200,
                  budget: int | None = None, heldout: int = 16, seq_len: int | None = None, seed: int = 0,
                  say=print) -> dict:
    from tabulate import tabulate

    cfg = load_config(model)
    sur = load_surrogate(sensitivity, cfg)
    space = build_space(cfg, sur.candidates())
    opts = SearchOptions(model=model, budget=1, out=out, corpus=tuple(corpus), heldout_windows=heldout,
                         seq_len=seq_len, seed=seed)
    ev, info = measured_evaluator(opts, cfg, space, sur)
    say(f"{cfg.name}: {len(space.units)} units; held-out {info['windows']} x {info['seq_len']} tokens")

    rows = []
    for u in uniform_allocations(space, sur):
        t0 = time.perf_counter()
        m = solve(space, sur, u.total_bytes)
        t_milp = time.perf_counter() - t0
        kl_u, kl_m = ev(u.assignment), ev(m.assignment)
        rows.append({"uniform": u.name, "bytes": u.total_bytes, "uniform_pred": u.additive_kl,
                     "uniform_kl": kl_u, "milp_bytes": m.total_bytes, "milp_pred": m.additive_kl,
                     "milp_kl": kl_m, "milp_s": t_milp})
        say(f"{u.name:28s} {u.total_bytes:>12,} B  uniform KL {kl_u:.5g}  MILP KL {kl_m:.5g}")

    t0 = time.perf_counter()
    front = pareto_front(space, sur, n_points=24)
    t_front = time.perf_counter() - t0

    if budget is None:   # the bin+r16 uniform's bytes: the DF-SSM-like operating point
        pick = next((r for r in rows if r["uniform"].startswith("bin+r16")), rows[len(rows) // 2])
        budget = pick["bytes"]
    m = solve(space, sur, budget)
    opt = {"budget": budget, "milp_pred": m.additive_kl, "milp_s": m.seconds}
    for sampler in ("tpe", "nsga2"):
        for warm in (False, True):
            key = f"{sampler}{'+warm' if warm else ''}"
            r = run_search(space, sur, budget, sampler=sampler, n_trials=trials, storage="memory",
                           warm_starts=[m.assignment] if warm else [], seed=seed, progress=False)
            opt[key] = {"best_pred": None if r.best is None else r.best.value,
                        "gap_to_milp": None if r.best is None else r.best.value / m.additive_kl - 1 if m.additive_kl else None,
                        "feasible": sum(t.feasible for t in r.trials), "trials": r.n_trials, "s": r.seconds}
            say(f"{key}: best {opt[key]['best_pred']} vs MILP {m.additive_kl:.6g} ({r.seconds:.1f} s)")

    a = [r[k] for r in rows for k in ("uniform_pred", "milp_pred")]
    mm = [r[k] for r in rows for k in ("uniform_kl", "milp_kl")]
    corr = fit_correction(a, mm)
    track = tracking(a, mm, corr).to_dict()

    res = {"model": model, "config": cfg.name, "sensitivity": sensitivity, "heldout": info, "uniform_vs_milp": rows,
           "front_s": t_front, "front_points": len(front), "optuna": opt, "correction": corr.to_dict(),
           "tracking": track, "measure_calls": ev.calls, "measure_s": ev.seconds}
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    write_json_atomic(outp / "bench.json", res)
    t1 = tabulate([[r["uniform"], f"{r['bytes']:,}", f"{r['milp_bytes']:,}", f"{r['uniform_pred']:.4g}",
                    f"{r['milp_pred']:.4g}", f"{r['uniform_kl']:.4g}", f"{r['milp_kl']:.4g}",
                    f"{r['uniform_kl'] / r['milp_kl']:.2f}x" if r["milp_kl"] > 0 else "", f"{r['milp_s']:.2f}"]
                   for r in rows],
                   headers=["uniform", "bytes", "MILP bytes", "pred uniform", "pred MILP", "KL uniform",
                            "KL MILP", "uniform/MILP", "MILP s"], tablefmt="github")
    t2 = tabulate([[k, v["trials"], v["feasible"], "" if v["best_pred"] is None else f"{v['best_pred']:.6g}",
                    "" if v["gap_to_milp"] is None else f"{100 * v['gap_to_milp']:.2f}%", f"{v['s']:.1f}"]
                   for k, v in opt.items() if isinstance(v, dict)],
                   headers=["sampler", "trials", "feasible", "best predicted KL", "above MILP", "s"], tablefmt="github")
    md = [f"# Planner benchmark: {cfg.name}", "",
          f"Held-out KL(teacher || plan) on {info['windows']} windows x {info['seq_len']} tokens.", "",
          "## KL-guided (MILP) vs uniform allocations at equal bytes", "", t1, "",
          f"## Optuna ({trials} trials, predicted objective) vs the MILP optimum at {budget:,} bytes", "",
          f"MILP: {m.additive_kl:.6g} in {m.seconds:.2f} s; Pareto front ({len(front)} points) in {t_front:.1f} s.", "",
          t2, "",
          f"Surrogate tracking over these plans: measured ~= {corr.scale:.3g} * sum^{corr.power:.3f}; "
          f"Spearman {track['spearman']}, median relative error {track['median_rel_err']}.", ""]
    write_text_atomic(outp / "bench.md", "\n".join(md))
    return res

