"""Latency and throughput against the baselines, with the memory-bandwidth bound drawn.

Renders every bench/*.json of the run. `dfplan bench kernels` results (benchmark "kernels") get
their own figure: per-call time of each implementation at batch 1 next to its bound (weight
bytes / bandwidth measured in the same run). Any other result file (end-to-end prefill/decode,
written by other bench subcommands) is read generically: a list of row objects under `rows`
or `results`, labelled by variant/impl/name, with the numeric fields it has; a field whose name
holds "bound" is drawn as the bound of the metric it belongs to. A file that cannot be
interpreted says so in one line instead of failing the report.
"""
from __future__ import annotations

from . import commands
from .context import Context, pyplot
from .fmt import count, fixed, is_num, missing, shell_join, sig, table

LABEL_KEYS = ("variant", "impl", "name", "model", "backend")
# preferred order of columns for generic rows; anything else numeric follows
KNOWN = ("batch", "prompt_tokens", "new_tokens", "decode_tok_s", "decode_ms_per_token", "decode_ms",
         "prefill_ms", "median_ms", "bound_tok_s", "bound_ms", "frac_bound", "x_bound", "model_bytes",
         "peak_rss_bytes", "peak_mem_bytes")
MAX_COLS = 9


def _kernels_figure(ctx: Context, res: dict, stem: str) -> str:
    plt = pyplot()
    rows = res["rows"]
    b0 = min(r["batch"] for r in rows)
    units = list(dict.fromkeys(r["unit"] for r in rows))
    fig, axes = plt.subplots(1, len(units), figsize=(3.3 * len(units) + 0.5, 3.6), squeeze=False)
    for ax, unit in zip(axes[0], units):
        rs = [r for r in rows if r["unit"] == unit and r["batch"] == b0]
        xs = range(len(rs))
        ax.bar(xs, [r["median_ms"] for r in rs], color=["tab:blue" if r["impl"].startswith(("bin", "int8"))
                                                         else "tab:gray" for r in rs])
        ax.scatter(xs, [r["bound_ms"] for r in rs], marker="_", s=400, color="black", zorder=5,
                   label="bandwidth bound")
        ax.set_xticks(list(xs), labels=[r["impl"] for r in rs], rotation=45, ha="right")
        ax.set_yscale("log")
        ax.set_title(f"{unit} {rs[0]['out']}x{rs[0]['in']}" if rs else unit)
        ax.set_ylabel("ms per call (median, cold weights)")
    axes[0][0].legend(loc="upper left", frameon=False)
    bw = res.get("bandwidth", {}).get("read_gbs")
    fig.suptitle(f"Kernels at batch {b0} on {res.get('config', {}).get('device', '?')}; "
                 f"bound = weight bytes / {fixed(bw, 1)} GB/s read bandwidth (same run)", fontsize=9)
    return ctx.save(fig, f"bench_{stem}", "kernel latency vs bandwidth bound")


def _kernels(ctx: Context, rel: str, res: dict) -> list[str]:
    rows = res.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return [f"`{rel}`: no result rows."]
    need = ("unit", "batch", "impl", "median_ms", "bound_ms")
    if any(k not in r for r in rows for k in need):
        return [f"`{rel}`: rows lack {', '.join(need)}; not rendered."]
    stem = rel.rsplit("/", 1)[-1].removesuffix(".json")
    cpu = (res.get("metadata") or {}).get("cpu") or {}
    out = [_kernels_figure(ctx, res, stem), "",
           ctx.reproduce(commands.bench_kernels(res, ctx.path_arg("bench"))), ""]
    body = [[r["unit"], f"{r.get('out', '?')}x{r.get('in', '?')}", str(r["batch"]), r["impl"],
             fixed(r["median_ms"], 3), fixed(r["bound_ms"], 3), fixed(r.get("x_bound"), 2),
             "" if r.get("speedup_vs_float") is None else fixed(r["speedup_vs_float"], 1) + "x"]
            for r in rows]
    out += [table(body, ["unit", "out x in", "batch", "impl", "median ms", "bound ms", "x bound", "vs float"]), ""]
    out.append(f"Machine: {cpu.get('model', '?')}, {cpu.get('torch_threads', '?')} threads, load average "
               f"{cpu.get('loadavg_1m_5m_15m', '?')} when measured; kernel ISA {res.get('cpu_kernel_isa') or 'n/a'}.")
    return out


def _rows(res: dict):
    for k in ("rows", "results"):
        v = res.get(k)
        if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            return v
    return None


def _label(r: dict) -> str:
    lab = next((str(r[k]) for k in LABEL_KEYS if r.get(k) is not None), "?")
    return lab + (f" b{r['batch']}" if is_num(r.get("batch")) and r.get("batch") != 1 else "")


def _generic_figure(ctx: Context, rows: list, stem: str, metric: str, bound: str | None) -> str:
    plt = pyplot()
    rs = [r for r in rows if is_num(r.get(metric))]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(rs) + 2), 3.6))
    xs = range(len(rs))
    ax.bar(xs, [r[metric] for r in rs], color="tab:blue")
    if bound:
        bx = [(x, r[bound]) for x, r in zip(xs, rs) if is_num(r.get(bound))]
        if bx:
            ax.scatter([x for x, _ in bx], [b for _, b in bx], marker="_", s=400, color="black", zorder=5,
                       label=f"bandwidth bound ({bound})")
            ax.legend(loc="upper right", frameon=False)
    ax.set_xticks(list(xs), labels=[_label(r) for r in rs], rotation=45, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(f"{stem}: {metric}")
    return ctx.save(fig, f"bench_{stem}", f"{stem} {metric}")


def _generic(ctx: Context, rel: str, res: dict) -> list[str]:
    rows = _rows(res)
    if rows is None:
        return [f"`{rel}`: no list of result rows (`rows` / `results`) found; keys {sorted(res)[:8]}; not rendered."]
    numeric = [k for k in dict.fromkeys(k for r in rows for k in r) if any(is_num(r.get(k)) for r in rows)]
    cols = [k for k in KNOWN if k in numeric] + [k for k in numeric if k not in KNOWN]
    cols = cols[:MAX_COLS]
    stem = rel.rsplit("/", 1)[-1].removesuffix(".json")
    out = []
    metric = next((k for k in cols if "tok_s" in k or "tokens_per_s" in k), None) \
        or next((k for k in cols if k.endswith("_ms") and "bound" not in k), None)
    if metric:
        fam = "tok_s" if "tok_s" in metric or "tokens_per_s" in metric else "_ms"
        bound = next((k for k in numeric if "bound" in k and fam in k), None)
        out += [_generic_figure(ctx, rows, stem, metric, bound), ""]
    body = [[_label(r)] + [sig(r.get(k), 4) if isinstance(r.get(k), float) else
                           (count(r[k]) if is_num(r.get(k)) else "") for k in cols] for r in rows]
    argv = res.get("argv") or (res.get("config") or {}).get("argv")
    cmd = res.get("command") if isinstance(res.get("command"), str) else \
        (shell_join(["dfplan", *argv]) if isinstance(argv, list) else "")
    out += [ctx.reproduce(cmd), "", table(body, ["variant"] + cols)]
    skipped = res.get("skipped")
    if isinstance(skipped, (list, dict)) and skipped:
        items = skipped.items() if isinstance(skipped, dict) else \
            [(s.get("variant", s.get("name", "?")), s.get("reason", "")) if isinstance(s, dict) else (s, "")
             for s in skipped]
        out += ["", "Skipped: " + "; ".join(f"{k} ({why})" if why else str(k) for k, why in items)]
    return out


def render(ctx: Context) -> str:
    out = ["## Latency and throughput", ""]
    files = ctx.run.glob("bench/*.json")
    if not files:
        return "\n".join(out + [missing("bench/*.json", "dfplan bench kernels --out RUN/bench",
                                        "latency against the baselines")])
    for rel in files:
        res = ctx.run.json(rel, "benchmark results")
        out += [f"### {rel}", ""]
        kind = res.get("benchmark")
        out += _kernels(ctx, rel, res) if kind == "kernels" else _generic(ctx, rel, res)
        out.append("")
    return "\n".join(out).rstrip()
