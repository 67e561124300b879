"""plan.md and pareto.csv: what the search chose, why, and what it was compared with."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from tabulate import tabulate

from dfplan.fileio import atomic_path
from dfplan.sizes import format_bytes

from .milp import solve


def write_front_csv(path: Path, front, sur) -> None:
    """bytes, additive KL, predicted KL of each MILP front point (+ its format counts)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget", "bytes", "additive_kl", "predicted_kl", "formats"])
        for p in front:
            counts = Counter(s.name for s in p.assignment.values())
            w.writerow([p.budget, p.total_bytes, f"{p.additive_kl:.9g}", f"{sur.correction(p.additive_kl):.9g}",
                        " ".join(f"{k}x{v}" for k, v in sorted(counts.items()))])


def _mb(n: int) -> str:
    return f"{n / 1e6:,.3f}"


def _state_line(plan) -> str:
    s = plan.state_dtype
    if plan.state_bytes_per_token is not None:
        s += f", {plan.state_bytes_per_token:,} bytes/token read + written"
    if plan.state_kl is not None and plan.state_dtype != "fp32":
        s += f", KL vs fp32 state {plan.state_kl:.3g}"
    return s


def _state_section(plan) -> list[str]:
    """The measured state precisions (search --state-dtype auto) and which one was kept."""
    st = plan.provenance.get("state") or {}
    kls, table = st.get("kl") or {}, st.get("bytes_per_token") or {}
    if not kls:
        return []
    rows = [["fp32", f"{table.get('fp32', 0):,}", "0 (reference)", "", "", "yes" if plan.state_dtype == "fp32" else ""]]
    for d, r in kls.items():
        rows.append([d, f"{table.get(d, 0):,}", f"{r['kl_mean']:.3g}", f"{r['kl_max']:.3g}", f"{r['top1_agree']:.1%}",
                     "yes" if plan.state_dtype == d else ""])
    prompt = st.get("prompt")
    files = [str(f) for f in prompt or []] if prompt != "random ids" else []
    src = ("seeded random ids" if prompt == "random ids" else
           f"held-out text of {files[0]}" if len(files) == 1 else
           f"held-out text of {len(files)} corpus files, e.g. {files[0]}" if files else "unrecorded")
    return ["## SSM state precision", "",
            f"Greedy generation of {st.get('tokens')} tokens after a {st.get('prompt_tokens')}-token prompt "
            f"({src}) with the fp32 state, the same tokens fed with the state in each precision; the cheapest "
            f"precision with mean KL <= {st.get('kl_max'):g} is kept, else fp32. The state does not change the "
            f"weight bytes or the budget.", "",
            tabulate(rows, headers=["state", "bytes/token", "mean KL", "max KL", "top-1 agree", "chosen"],
                     tablefmt="github"), ""]


def render_summary(plan, space, sur, milp, front, uniforms, runs, budget: int, evaluator_info=None) -> str:
    prov = plan.provenance
    lines = [f"# Plan for {space.cfg.name} under {format_bytes(budget)}", ""]
    if plan.notes:
        lines += [f"> {plan.notes}", ""]
    head = [["budget", format_bytes(budget)],
            ["predicted bytes", format_bytes(plan.predicted_bytes)],
            ["headroom", f"{budget - plan.predicted_bytes:,} bytes"],
            ["pseudo-KL (size-only prior, not nats)" if sur.source == "prior" else "predicted KL (nats/token)",
             f"{plan.predicted_kl:.6g}"],
            ["solver", plan.solver],
            ["scores", sur.source],
            ["MILP", f"{milp.status}, gap {milp.gap:.2g}, dual bound {milp.dual_bound:.6g}, {milp.seconds:.2f} s"]]
    if prov.get("measured_kl") is not None:
        head.append(["measured KL (held-out)", f"{prov['measured_kl']:.6g}"])
    head.append(["SSM state while decoding", _state_line(plan)])
    lines += [tabulate(head, tablefmt="github", headers=["", ""]), ""]
    lines += _state_section(plan)

    # formats per kind
    by_kind: dict[str, Counter] = {}
    for u in space.units:
        by_kind.setdefault(u.unit.kind, Counter())[plan.specs[u.unit.name].name] += 1
    rows = [[k, ", ".join(f"{s} x{n}" for s, n in sorted(c.items(), key=lambda x: -x[1]))]
            for k, c in by_kind.items()]
    ranks = [s.rank for s in plan.specs.values() if getattr(s, "rank", 0)]
    lines += ["## Formats by kind", "", tabulate(rows, headers=["kind", "formats"], tablefmt="github"), ""]
    if ranks:
        lines += [f"Low-rank corrections on {len(ranks)} units, mean rank {sum(ranks) / len(ranks):.1f}.", ""]

    # comparison with uniform allocations at their own bytes
    if uniforms:
        rows = []
        for u in uniforms:
            try:
                m = solve(space, sur, u.total_bytes, time_limit=30).predicted_kl
            except Exception:   # a uniform below the minimum cannot happen; be safe in a report
                m = float("nan")
            rows.append([u.name, _mb(u.total_bytes), f"{u.predicted_kl:.6g}", f"{m:.6g}",
                         "yes" if u.total_bytes <= budget else ""])
        lines += ["## Uniform allocations vs the exact optimum at the same bytes", "",
                  tabulate(rows, headers=["uniform", "MB", "predicted KL", "MILP KL at same bytes", "fits budget"],
                           tablefmt="github"), ""]

    if runs:
        rows = [[k, r.n_trials, r.n_new, sum(t.feasible for t in r.trials),
                 "" if r.best is None else f"{r.best.value:.6g}",
                 "" if r.best is None else _mb(r.best.total_bytes), f"{r.seconds:.1f}"] for k, r in runs.items()]
        lines += ["## Optuna", "", f"MILP optimum (predicted): {milp.predicted_kl:.6g}", "",
                  tabulate(rows, headers=["sampler", "trials", "new", "feasible", "best KL", "MB", "s"],
                           tablefmt="github"), ""]
    corr = prov.get("correction")
    if corr:
        t = corr["tracking"]
        def f(x, spec=".3f"):
            return "n/a" if x is None else format(x, spec)
        lines += ["## Surrogate vs measured", "",
                  f"Fitted measured ~= {corr['correction']['scale']:.4g} * additive^{corr['correction']['power']:.3f} "
                  f"on {t['n']} measured plans: Spearman {f(t['spearman'])}, Pearson of log KL "
                  f"{f(t['pearson_log'])}, median relative error {f(t['median_rel_err'], '.1%')} after the "
                  f"correction ({f(t['raw_median_rel_err'], '.1%')} for the plain sum), worst "
                  f"{f(t['max_rel_err'], '.1%')}.", ""]
        if prov.get("validation"):
            rows = [[v["plan"], _mb(v["bytes"]), f"{v['additive_kl']:.6g}", f"{sur.correction(v['additive_kl']):.6g}",
                     f"{v['measured_kl']:.6g}"] for v in prov["validation"]]
            lines += [tabulate(rows, headers=["plan", "MB", "sum of unit KL", "corrected", "measured KL"],
                               tablefmt="github"), ""]

    if front:
        rows = [[_mb(p.total_bytes), f"{p.predicted_kl:.6g}"] for p in front]
        lines += ["## Pareto front (MILP, bytes vs predicted KL)", "",
                  tabulate(rows, headers=["MB", "predicted KL"], tablefmt="github"), "",
                  "Full front with format counts: pareto.csv.", ""]

    rows = [[u.unit.name, u.unit.kind, plan.specs[u.unit.name].name,
             f"{plan.specs[u.unit.name].nbytes(u.unit.shape):,}", f"{sur.unit_kl(u.unit.name, plan.specs[u.unit.name]):.4g}"]
            for u in space.units]
    lines += ["## Per unit", "", tabulate(rows, headers=["unit", "kind", "format", "bytes", "unit KL"],
                                           tablefmt="github"), "",
              f"Fixed tensors (norms, conv1d, A_log, D, dt_bias, biases) in {space.default.name}: "
              f"{space.fixed_bytes:,} bytes.", ""]
    return "\n".join(lines)
