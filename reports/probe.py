"""The knowledge-organisation probe (`dfplan probe --out DIR`, DIR inside the run folder): where
categorisation, recall and output formatting happen along depth, for the teacher and a compared
student, redrawn from probe_layers.csv / probe_swap.csv with the probe's own figure."""
from __future__ import annotations

import warnings

from dfplan.probe.plot import probe_figure

from .context import Context
from .fmt import code, fixed, pct, shell_join, table

PRODUCER = "dfplan probe --model M --prompts P --out RUN/probe"


def _probe_dirs(ctx: Context) -> list[str]:
    """probe.json at the run's top level or one folder down (e.g. RUN/probe/)."""
    found = ctx.run.glob("probe.json") + ctx.run.glob("*/probe.json")
    return [rel.rsplit("/", 1)[0] + "/" if "/" in rel else "" for rel in found]


def _cell(v) -> str:
    if isinstance(v, str):
        return v
    return str(int(v)) if float(v).is_integer() else fixed(v, 3)


def _phase(r) -> str:
    return "-" if not r else f"{r[0]}..{r[1]}"


def _one(ctx: Context, prefix: str, idx: int) -> str:
    summary = ctx.run.json(f"{prefix}probe.json", "probe summary: prompts, phases, recall disturbance")
    layers = ctx.run.csv(f"{prefix}probe_layers.csv", "probe metrics per model and depth",
                         required=("model", "layer", "category_accuracy", "median_rank"))
    if layers is None:
        return f"_`{prefix}probe.json` has no `probe_layers.csv` beside it; rerun `{PRODUCER}`._"
    swap = ctx.run.csv(f"{prefix}probe_swap.csv", "probe: answer damage with one student block swapped in")
    k, chance = int(summary["top_k"]), float(summary["chance"])
    p = summary["prompts"]
    lines = [f"Prompts: `{p.get('path')}` ({p.get('n')} prompts, {p.get('categories')} categories; chance "
             f"category accuracy {fixed(chance, 3)}); logit lens top-{k}.", ""]
    rows = []
    for m in summary["models"]:
        ph = m.get("phases") or {}
        rows.append([m["name"], f"`{m.get('model')}`", pct(m.get("final_top1")), pct(m.get("final_top10")),
                     _phase(ph.get("categorisation")), _phase(ph.get("recall")), _phase(ph.get("formatting"))])
    lines += [table(rows, ["model", "path", "answer top-1", f"top-{k}", "categorisation", "recall", "formatting"]),
              ""]
    for m in summary["models"]:
        for note in (m.get("phases") or {}).get("notes") or []:
            lines.append(f"- {m['name']}: {note}")
    if summary.get("recall_disturbance"):
        worst = summary["recall_disturbance"][:3]
        lines.append("- blocks whose compression disturbs recall most (answer log-prob drop with only that block "
                     "the student's): " + ", ".join(f"block {w.get('block')} ({fixed(w.get('logprob_drop'), 3)})"
                                                   for w in worst))
    lines.append("")
    shown = layers[["model", "layer", "phase", "category_accuracy", "category_separation", f"top{k}_rate",
                    "median_rank"]] if "phase" in layers.columns else layers
    lines += [table([[_cell(v) for v in r] for r in shown.itertuples(index=False)], list(shown.columns)), ""]
    rows_by = {name: g.sort_values("layer").to_dict("records") for name, g in layers.groupby("model", sort=False)}
    names = [m["name"] for m in summary["models"]]
    teacher, student = rows_by.get(names[0]), rows_by.get(names[1]) if len(names) > 1 else None
    phases = [m.get("phases") for m in summary["models"]]
    fname = f"probe_{idx}.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)     # tight_layout vs the report's constrained layout
        probe_figure(ctx.stage_dir / fname, teacher, phases[0], k, chance, student,
                     phases[1] if student is not None else None,
                     swap.to_dict("records") if swap is not None else None,
                     title=f"knowledge probe: {', '.join(names)}")
    ctx.figures.append(fname)
    lines.append(f"![knowledge probe along depth]({ctx.fig_prefix}{fname})")
    extra = [(f"{prefix}{n}", why) for n, why in (("probe_prompts.csv", "per-prompt readout"),
                                                  ("probe_prompts.jsonl", "the prompt set as run"),
                                                  ("probe.md", "the probe's own summary"))]
    links = []
    for rel, why in extra:
        if ctx.run.has(rel):
            ctx.run.use(rel, f"probe: {why} (linked)")
            links.append(f"[{rel.rsplit('/', 1)[-1]}]({ctx.link(rel)}) ({why})")
    if links:
        lines += ["", "Also: " + ", ".join(links) + "."]
    opts = summary.get("options") or {}
    argv = ["dfplan", "probe", "--model", opts.get("model", "M"), "--prompts", opts.get("prompts", p.get("path")),
            *(["--compare", opts["compare"]] if opts.get("compare") else []), "--out", ctx.path_arg(prefix.rstrip("/") or ".")]
    lines += ["", "Reproduce:", "", code(shell_join(argv), ctx.report_cmd())]
    return "\n".join(lines)


def render(ctx: Context) -> str:
    dirs = _probe_dirs(ctx)
    head = "## Knowledge probe"
    if not dirs:
        return f"{head}\n\n_Not available: no `probe.json` in the run (or one folder down); `{PRODUCER}` writes it._"
    return head + "\n\n" + "\n\n".join(_one(ctx, d, i) for i, d in enumerate(dirs))
