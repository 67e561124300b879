"""Per-layer allocation: bits per weight and low-rank correction rank by depth, every plan of the
run side by side (one table column per plan, one colour per plan in the figure)."""
from __future__ import annotations

from collections import Counter

from dfplan.formats.units import compressible_units

from .context import Context, pyplot
from .fmt import fixed, missing, table
from .sensitivity import short_unit

COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")
MARKERS = {"in_proj": "o", "out_proj": "s", "attn_in": "^", "attn_out": "v", "fc1": "<", "fc2": ">",
           "embedding": "D", "lm_head": "D"}


def allocations(ctx: Context) -> dict[str, list[dict]]:
    """plan name -> one row per unit: name, kind, block, format, bits/weight, rank."""
    out = {}
    units = compressible_units(ctx.cfg)
    for name, plan in ctx.plans.items():
        spec = plan.resolve(ctx.cfg)
        out[name] = [{"unit": u.name, "kind": u.kind, "block": u.block, "format": spec[u.name].name,
                      "bits": spec[u.name].bits_per_weight(u.shape), "rank": getattr(spec[u.name], "rank", 0)}
                     for u in units]
    return out


def is_scaffold(fmt: str) -> bool:
    return fmt.startswith(("bin", "fbi"))


def figure(ctx: Context, alloc: dict) -> str:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True)
    n = len(alloc)
    width = 0.8 / max(n, 1)
    for k, ((name, rows), col) in enumerate(zip(alloc.items(), COLORS)):
        off = (k - (n - 1) / 2) * width * 0.5      # small shift so two plans' markers do not hide
        for kind in dict.fromkeys(r["kind"] for r in rows):
            rs = [r for r in rows if r["kind"] == kind]
            xs = [r["block"] + off for r in rs]
            a1.plot(xs, [r["bits"] for r in rs], marker=MARKERS.get(kind, "o"), color=col, ms=5,
                    ls="-" if kind == "in_proj" else "--", lw=1, label=f"{name}: {kind}")
            a2.plot(xs, [r["rank"] for r in rs], marker=MARKERS.get(kind, "o"), color=col, ms=5,
                    ls="-" if kind == "in_proj" else "--", lw=1)
    from matplotlib.ticker import ScalarFormatter
    a1.set_ylabel("bits per weight (log scale)")
    a1.set_yscale("log", base=2)
    a1.yaxis.set_major_formatter(ScalarFormatter())
    a1.set_title("Allocation by depth (emb = embedding, head = untied lm_head)")
    a2.set_ylabel("low-rank correction rank")
    a2.set_xlabel("block (depth)")
    blocks = sorted({r["block"] for rows in alloc.values() for r in rows})
    n_layer = ctx.cfg.n_layer
    a2.set_xticks(blocks, labels=["emb" if b < 0 else ("head" if b >= n_layer else str(b)) for b in blocks])
    a1.legend(loc="center left", bbox_to_anchor=(1.01, 0.0), frameon=False)
    return ctx.save(fig, "allocation", "per-layer allocation")


def summary(rows: list[dict]) -> str:
    lin = [r for r in rows if r["kind"] not in ("embedding", "lm_head")]
    n_s = sum(is_scaffold(r["format"]) for r in lin)
    fmts = Counter(r["format"] for r in lin)
    return (f"{n_s} of {len(lin)} projections 1-bit scaffolds"
            + (f" (+ int8 low-rank corrections on {sum(r['rank'] > 0 for r in lin if is_scaffold(r['format']))})"
               if n_s else "")
            + "; " + ", ".join(f"{f} x{c}" for f, c in sorted(fmts.items(), key=lambda x: (-x[1], x[0]))))


def render(ctx: Context) -> str:
    out = ["## Per-layer allocation", ""]
    if not ctx.plans:
        return "\n".join(out + [missing("plan.json", "dfplan search")])
    if ctx.cfg is None:
        return "\n".join(out + ["_Not available: no model config in the run (teacher/config.json, "
                                "sensitivity.json or student/config.json) to resolve the plan's units._"])
    alloc = allocations(ctx)
    out += [f"- **{name}**: {summary(rows)}" for name, rows in alloc.items()] + [""]
    out += [figure(ctx, alloc), "", ctx.reproduce(), ""]
    names = list(alloc)
    first = alloc[names[0]]
    rows = []
    for i, u in enumerate(first):
        r = [short_unit(u["unit"]), u["kind"]]
        for n in names:
            a = alloc[n][i]
            r += [a["format"], fixed(a["bits"], 3)]
        rows.append(r)
    head = ["unit", "kind"] + [h for n in names for h in (f"{n} format", f"{n} bits/weight")]
    out += [table(rows, head)]
    return "\n".join(out)
