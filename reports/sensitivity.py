"""Sensitivity: the unit x format KL heatmap (log scale), the table behind it, its validation."""
from __future__ import annotations

import math

import numpy as np

from dfplan.formats.units import KINDS

from . import commands
from .context import Context, pyplot
from .fmt import fixed, missing, sig, table

TABLE = "sensitivity.csv"
PROV = "sensitivity.json"
VALIDATION = "validation.json"
BLOCKS = "sensitivity_blocks.csv"
MAX_TABLE_UNITS = 40        # above this, the table shows the most sensitive units only
ANNOTATE_CELLS = 160        # write the value in each cell when the heatmap is this small


def unit_order(df) -> list[str]:
    """Model order: embedding, then block by block in the model's kind order, lm_head last."""
    kind_rank = {k: i for i, k in enumerate(KINDS)}
    first = df.drop_duplicates("unit")
    keyed = sorted(first.itertuples(), key=lambda r: (int(r.block), kind_rank.get(r.kind, 99), r.unit))
    return [r.unit for r in keyed]


def spec_order(df) -> list[str]:
    """Formats from the most bytes (mildest) to the fewest (harshest), by mean bytes per unit."""
    return list(df.groupby("spec")["bytes"].mean().sort_values(ascending=False).index)


def pivot(df):
    """-> DataFrame (units in model order) x (formats, mildest first) of KL; NaN where a format
    was not a candidate for that unit."""
    return df.pivot_table(index="unit", columns="spec", values="kl", aggfunc="first") \
             .reindex(index=unit_order(df), columns=spec_order(df))


def short_unit(name: str) -> str:
    """backbone.layers.3.mixer.in_proj -> L3 in_proj; backbone.embedding -> embedding."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"L{parts[i + 1]} {parts[-1]}"
    return parts[-1]


def heatmap(ctx: Context, pv) -> str:
    plt = pyplot()
    from matplotlib.colors import LogNorm
    vals = pv.to_numpy(dtype=float)
    pos = vals[np.isfinite(vals) & (vals > 0)]
    floor = float(pos.min()) if pos.size else 1e-6
    shown = np.where(np.isfinite(vals), np.maximum(vals, floor), np.nan)   # KL 0 (exact) at the floor
    n_u, n_s = vals.shape
    fig, ax = plt.subplots(figsize=(1.4 + 0.75 * n_s, 1.2 + 0.3 * n_u))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    hi = float(np.nanmax(shown)) if pos.size else 1.0
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap=cmap,
                   norm=LogNorm(vmin=floor, vmax=max(hi, floor * 10)))
    ax.set_xticks(range(n_s), labels=list(pv.columns), rotation=45, ha="right")
    ax.set_yticks(range(n_u), labels=[short_unit(u) for u in pv.index])
    ax.grid(False)
    ax.set_xlabel("format (most bytes left, fewest right)")
    ax.set_ylabel("unit (model order)")
    ax.set_title("KL(teacher || one unit compressed), nats/token, log scale")
    fig.colorbar(im, ax=ax, label="KL (nats/token)")
    if n_u * n_s <= ANNOTATE_CELLS:
        mid = math.sqrt(floor * max(hi, floor * 10))
        for i in range(n_u):
            for j in range(n_s):
                if np.isfinite(vals[i, j]):
                    ax.text(j, i, sig(vals[i, j], 2), ha="center", va="center", fontsize=6.5,
                            color="white" if shown[i, j] < mid else "black")
    return ctx.save(fig, "sensitivity_heatmap", "sensitivity heatmap")


def _table(pv) -> tuple[str, str]:
    note = ""
    if len(pv.index) > MAX_TABLE_UNITS:
        top = pv.max(axis=1).sort_values(ascending=False).index[:MAX_TABLE_UNITS // 2]
        pv = pv.loc[[u for u in pv.index if u in set(top)]]
        note = f"The {len(pv)} units with the largest KL at any format (all units are in the heatmap and in {TABLE}).\n\n"
    rows = [[u] + [sig(v, 3) if np.isfinite(v) else "" for v in r] for u, r in zip(pv.index, pv.to_numpy(float))]
    return note, table(rows, ["unit", *pv.columns])


def _blocks(ctx: Context) -> str:
    df = ctx.run.csv(BLOCKS, "whole-block sensitivity table", required=("block", "spec", "kl"))
    if df is None:
        return missing(BLOCKS, "dfplan sensitivity --blocks", "every unit of a block compressed together")
    if df.empty:
        return f"`{BLOCKS}` has no rows."
    pv = df.pivot_table(index="block", columns="spec", values="kl", aggfunc="first")
    order = [s for s in spec_order(df) if s in pv.columns] if "bytes" in df.columns else list(pv.columns)
    pv = pv.reindex(columns=order).sort_index()
    rows = [[str(b)] + [sig(v, 3) if np.isfinite(v) else "" for v in r] for b, r in zip(pv.index, pv.to_numpy(float))]
    return (f"Whole blocks (every unit of the block at one format, `{BLOCKS}`), KL nats/token:\n\n"
            + table(rows, ["block", *pv.columns]))


def _validation(ctx: Context) -> str:
    v = ctx.run.json(VALIDATION, "sensitivity validation (Spearman vs true perplexity change)")
    if v is None:
        return missing(VALIDATION, "dfplan sensitivity validate --out RUN/validation.json",
                       "does KL rank units the way true perplexity does")
    sp, within = v.get("spearman") or {}, v.get("spearman_within_spec") or {}
    rows = [[m, sig((sp.get(m) or {}).get("rho"), 3), sig((sp.get(m) or {}).get("p"), 2),
             sig((within.get(m) or {}).get("mean_rho"), 3)] for m in sp]
    b = v.get("baseline") or {}
    return (f"Validation ({VALIDATION}): {v.get('n_rows', 'n/a')} (unit, format) rows compressed alone and "
            f"measured on held-out text (baseline ppl {fixed(b.get('ppl'))}); Spearman correlation of each "
            f"score with the true perplexity change.\n\n"
            + table(rows, ["score", "Spearman (all rows)", "p", "mean within one format"]))


def render(ctx: Context) -> str:
    out = ["## Sensitivity", ""]
    df = ctx.run.csv(TABLE, "sensitivity heatmap and table", required=("unit", "kind", "block", "spec", "bytes", "kl"))
    if df is None:
        return "\n".join(out + [missing(TABLE, "dfplan sensitivity", "per unit x format KL")])
    prov = ctx.run.json(PROV, "sensitivity provenance (calibration, command)")
    if df.empty:
        return "\n".join(out + [f"`{TABLE}` has no rows."])
    pv = pivot(df)
    cal = (prov or {}).get("calibration") or {}
    out += [f"{len(df)} (unit, format) rows over {len(pv.index)} units and {len(pv.columns)} formats"
            + (f", measured on {cal['windows']} calibration windows of {cal['seq_len']} tokens"
               if cal.get("windows") and cal.get("seq_len") else "")
            + f" (`{TABLE}`" + (f", `{PROV}`" if prov else "") + "). Grey: format not a candidate for that unit.", ""]
    out += [heatmap(ctx, pv), "", ctx.reproduce(commands.sensitivity(prov, ctx.path_arg(TABLE))), ""]
    note, tab = _table(pv)
    out += ["KL (nats/token) per unit and format:", "", note + tab, "", _blocks(ctx), "", _validation(ctx)]
    return "\n".join(out)
