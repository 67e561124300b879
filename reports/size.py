"""Size breakdown: what the bytes of each plan are spent on, next to the fp16 teacher, and the
packed artifact's payload checked against the plan's exact count."""
from __future__ import annotations

from dfplan.formats.size import plan_bytes

from .context import Context, pyplot
from .fmt import count, missing, pct, table

CATEGORIES = ("embedding / lm_head", "1-bit scaffold signs", "scaffold scales", "low-rank corrections",
              "IntN codes + scales", "float weights", "other tensors (norms, conv1d, A_log, D, dt_bias)")
COLORS = ("#8c564b", "#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c", "#9467bd", "#7f7f7f")


def categories(report) -> dict[str, int]:
    """bytes per category (CATEGORIES) of one dfplan.formats.size.SizeReport."""
    out = dict.fromkeys(CATEGORIES, 0)
    for c in report.components:
        for role, n in c["parts"].items():
            if c["kind"] == "other":
                key = CATEGORIES[6]
            elif c["kind"] in ("embedding", "lm_head"):
                key = CATEGORIES[0]
            elif role == "bits":
                key = CATEGORIES[1]
            elif role == "correction":
                key = CATEGORIES[3]
            elif role == "scales" and c["spec"].startswith(("bin", "fbi")):
                key = CATEGORIES[2]
            elif role == "weight":
                key = CATEGORIES[5]
            else:
                key = CATEGORIES[4]
            out[key] += n
    return out


def figure(ctx: Context, cats: dict[str, dict], fp16: int) -> str:
    plt = pyplot()
    names = list(cats)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.55 * (len(names) + 1)))
    ys = list(range(len(names)))
    for y, n in zip(ys, names):
        left = 0.0
        for cat, col in zip(CATEGORIES, COLORS):
            w = cats[n][cat] / 1e6
            if w > 0:
                ax.barh(y, w, left=left, color=col, edgecolor="white",
                        label=cat if y == next(i for i, m in enumerate(names) if cats[m][cat] > 0) else None)
                left += w
        ax.text(left, y, f"  {left:,.3f} MB ({fp16 / 1e6 / left:.2f}x smaller)" if left else "", va="center",
                fontsize=7.5)
    ax.barh(len(names), fp16 / 1e6, color="#d62728", alpha=0.35, label="fp16 teacher")
    ax.text(fp16 / 1e6, len(names), f"  {fp16 / 1e6:,.3f} MB", va="center", fontsize=7.5)
    ax.set_yticks(ys + [len(names)], labels=names + ["fp16 teacher"])
    ax.invert_yaxis()
    ax.set_xlim(0, fp16 / 1e6 * 1.35)
    ax.set_xlabel("bytes (MB, 10^6)")
    ax.set_title("Where the bytes go (exact packed payload)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False)
    return ctx.save(fig, "size_breakdown", "size breakdown")


def render(ctx: Context) -> str:
    out = ["## Size breakdown", ""]
    if not ctx.plans:
        return "\n".join(out + [missing("plan.json", "dfplan search")])
    if ctx.cfg is None:
        return "\n".join(out + ["_Not available: no model config in the run to size the plan against._"])
    reports = {n: plan_bytes(ctx.cfg, p) for n, p in ctx.plans.items()}
    fp16 = 2 * next(iter(reports.values())).params
    cats = {n: categories(r) for n, r in reports.items()}
    out += [figure(ctx, cats, fp16), "", ctx.reproduce(*[f"dfplan size --model {ctx.cfg_source} --plan "
                                                         f"{ctx.path_arg(v.rel('plan.json'))}"
                                                         for v in ctx.variants if ctx.cfg_source]), ""]
    names = list(reports)
    rows = [[cat] + [x for n in names for x in (count(cats[n][cat]), pct(cats[n][cat] / reports[n].total_bytes))]
            for cat in CATEGORIES if any(cats[n][cat] for n in names)]
    rows.append(["total"] + [x for n in names for x in (count(reports[n].total_bytes), pct(1.0))])
    out += [table(rows, ["bytes on"] + [h for n in names for h in (f"{n} bytes", f"{n} share")]), ""]
    out.append(f"fp16 teacher: {count(fp16)} bytes ({count(fp16 // 2)} parameters).")
    for v in ctx.variants:
        m = ctx.run.json(v.rel("student/manifest.json"), "packed payload bytes (checked against the plan)")
        if m is None:
            out.append(f"- {v.name}: " + missing(v.rel("student/manifest.json"), "dfplan distill",
                                                  "the packed student"))
            continue
        want = reports[v.name].total_bytes
        got = m.get("payload_bytes")
        verdict = "matches the plan's exact count" if got == want else f"differs from the plan's {count(want)}"
        files = m.get("files") if isinstance(m.get("files"), dict) else {}
        listed = ", ".join(f"`{v.rel('student/' + f)}` {count((i or {}).get('bytes'))} B" for f, i in sorted(files.items()))
        out.append(f"- {v.name}: packed student (`{v.rel('student/manifest.json')}`) payload {count(got)} bytes, "
                   f"{verdict}" + (f"; files: {listed}" if listed else "") + ".")
    return "\n".join(out)
