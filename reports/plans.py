"""The run's plans side by side: budget, bytes, formats, predicted and measured quality.

A run has its main plan (plan.json) and may hold more in subfolders (the demo searches a second,
tighter budget into dfssm/ so the DF-SSM format, 1-bit scaffolds + int8 low-rank corrections,
is shown next to the plan the default budget gives).
"""
from __future__ import annotations

from collections import Counter

from dfplan.formats.size import plan_bytes

from .allocation import is_scaffold
from .context import Context
from .fmt import count, fixed, missing, pct, sig, table


def _formats(resolved: dict, cfg) -> dict[str, str]:
    from dfplan.formats.units import compressible_units
    by_kind: dict[str, Counter] = {}
    for u in compressible_units(cfg):
        by_kind.setdefault(u.kind, Counter())[resolved[u.name].name] += 1
    return {k: ", ".join(f"{f} x{n}" for f, n in sorted(c.items(), key=lambda x: (-x[1], x[0])))
            for k, c in by_kind.items()}


def _searched(ctx: Context, v) -> str:
    """Which formats the search could choose: every format of the run's sensitivity table, or
    those of a plan folder's own (restricted) table, e.g. the demo's DF-SSM-only dfssm/."""
    rel = v.rel("sensitivity.csv") if v.prefix and ctx.run.has(v.rel("sensitivity.csv")) else "sensitivity.csv"
    df = ctx.run.csv(rel, "formats the search could choose" if v.prefix else "sensitivity heatmap and table",
                     required=("unit", "kind", "spec"))
    if df is None:
        return "n/a"
    if v.prefix and ctx.run.has(v.rel("sensitivity.json")):
        ctx.run.use(v.rel("sensitivity.json"), "provenance of the restricted table (copied from the run's)")
    lin = df[~df["kind"].isin(["embedding", "lm_head"])]
    head = df[df["kind"].isin(["embedding", "lm_head"])]
    return f"projections: {_compact(lin['spec'])}; embedding: {_compact(head['spec'])} (`{rel}`)"


def _compact(specs) -> str:
    """bin, bin+r8, bin+r16, int2, int4 -> "bin, bin+r8..r16, int2..int4" (one family per group)."""
    import re
    fams: dict[str, list] = {}
    for s in sorted(set(specs)):
        m = re.fullmatch(r"(bin\+r|int)(\d+)", s)
        fams.setdefault(m.group(1) if m else s, []).append(int(m.group(2)) if m else None)
    parts = []
    for fam, ns in fams.items():
        ns = sorted(n for n in ns if n is not None)
        if not ns:
            parts.append(fam)
        elif len(ns) == 1:
            parts.append(f"{fam}{ns[0]}")
        else:
            parts.append(f"{fam}{ns[0]}..{'r' if fam.startswith('bin') else 'int'}{ns[-1]}" if fam.startswith("bin")
                         else f"int{ns[0]}..int{ns[-1]}")
    return ", ".join(parts) or "none"


def render(ctx: Context) -> str:
    out = ["## Plans", ""]
    if not ctx.plans:
        return "\n".join(out + [missing("plan.json", "dfplan search", "the chosen per-unit formats")])
    cols = {}
    kinds: list[str] = []
    for v in ctx.variants:
        p = ctx.plans[v.name]
        c = {"plan file": v.rel("plan.json"), "solver": p.solver or "n/a",
             "formats searched": _searched(ctx, v),
             "budget (bytes)": count(p.budget_bytes), "plan bytes": count(p.predicted_bytes),
             "predicted KL": sig(p.predicted_kl)}
        if ctx.cfg is not None:
            rep = plan_bytes(ctx.cfg, p)
            fp16 = 2 * rep.params
            c["share of fp16"] = pct(rep.total_bytes / fp16)
            c["compression vs fp16"] = fixed(fp16 / rep.total_bytes, 2) + "x"
            resolved = p.resolve(ctx.cfg)
            lin = [n for n, s in resolved.items() if not n.endswith(("embedding", "lm_head"))]
            c["1-bit scaffold projections"] = f"{sum(is_scaffold(resolved[n].name) for n in lin)} of {len(lin)}"
            for k, f in _formats(resolved, ctx.cfg).items():
                c[f"formats: {k}"] = f
                if k not in kinds:
                    kinds.append(k)
        ev = ctx.run.json(v.rel("student/eval.json"), "teacher vs student perplexity and KL (same windows)")
        if ev:
            for key, label in (("ptq", "untrained"), ("student", "distilled")):
                r = ev.get(key) or {}
                c[f"KL {label} (measured)"] = sig(r.get("kl_to_teacher"))
                c[f"ppl {label}"] = fixed(r.get("ppl"))
            c["ppl teacher"] = fixed((ev.get("teacher") or {}).get("ppl"))
        he = ctx.run.json(v.rel("eval.json"), "held-out perplexity of the packed artifact")
        if he:
            c["held-out ppl student / teacher"] = f"{fixed(he.get('ppl'))} / {fixed(he.get('teacher_ppl'))}"
        cols[v.name] = c
    keys = list(dict.fromkeys(k for c in cols.values() for k in c))
    rows = [[k] + [cols[n].get(k, "") for n in cols] for k in keys]
    out += [table(rows, [""] + list(cols)), ""]
    summaries = [v.rel("plan.md") for v in ctx.variants if ctx.run.has(v.rel("plan.md"))]
    for rel in summaries:
        ctx.run.use(rel, "the search's own summary (linked)")
    if summaries:
        out += ["The search's own summaries: " + ", ".join(f"[`{r}`]({ctx.link(r)})" for r in summaries) + ".", ""]
    for w in ctx.warnings:
        out.append(f"> warning: {w}")
    return "\n".join(out).rstrip()
