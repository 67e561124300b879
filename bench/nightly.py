"""`dfplan bench nightly --history DIR`: a fixed suite, compared with its history, appended.

Suite (fixed, so runs line up): the kernel micro-benchmark on mamba2-1.3b shapes and the
end-to-end bench on the tiny teacher's shape and on mamba2-1.3b (random init: speed does not
depend on the weights' values; the real teacher is not needed offline). `--suite tiny` runs
only the tiny parts (for CI smoke runs).

History: DIR/runs/<UTC time>-<commit>/<name>.json, one result file per suite entry. A
regression is flagged only when the last TWO runs both violate against the run before them
(as asv and PyTorch's dashboards do), so one noisy night never pages anyone; a change of
machine or benchmark version resets the baseline with a note. DIR/summary.md and
DIR/trend.png are rewritten every run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dfplan.errors import DfplanError
from dfplan.fileio import write_text_atomic

from . import schema
from .compare import compare

SUITES = ("full", "tiny")


@dataclass
class NightlyConfig:
    history: str
    suite: str = "full"
    device: str = "cpu"
    threads: int | None = None
    e2e_variants: tuple | None = None     # None: the device's default set


# running the suite --------------------------------------------------------------------------------
def kernels_as_result(k: dict) -> dict:
    """bench kernels' rows in the result schema: variant unit/impl, case b<batch>, metric ms."""
    res = schema.new_result("kernels", {**k["config"], "model_name": k["config"]["model"]})
    for r in k["rows"]:
        v = res["variants"].setdefault(f'{r["unit"]}/{r["impl"]}', {
            "status": "ok", "description": f'{r["impl"]} {r["out"]}x{r["in"]}',
            "model_bytes": r["weight_bytes"], "cases": {}})
        v["cases"][f'b{r["batch"]}'] = {
            "batch": r["batch"], "status": "ok",
            "metrics": {"ms": {"n": r["samples"], "median": r["median_ms"], "p10": r["p10_ms"],
                               "p90": r["p90_ms"], "samples": None}},
            "frac_bandwidth": r["frac_bandwidth"]}
    res["bandwidth"] = k["bandwidth"]
    start = k["metadata"]["cpu"].get("loadavg_1m_5m_15m") or [0.0]
    end = k.get("loadavg_after") or [0.0]
    res["load"] = {"start": start, "end": end, "max_1m": max(start[0], end[0])}
    res["loadavg_after"] = end
    return res


def run_suite(cfg: NightlyConfig, log=print) -> dict[str, dict]:
    from .e2e import E2EConfig, run_e2e
    from .kernels import BenchConfig, run_kernel_bench

    if cfg.suite not in SUITES:
        raise DfplanError(f"unknown suite {cfg.suite!r}; choose from {', '.join(SUITES)}")
    out = {}
    kmodel = "1.3b" if cfg.suite == "full" else "tiny"
    log(f"kernels on {kmodel} shapes")
    out["kernels"] = kernels_as_result(run_kernel_bench(BenchConfig(
        model=kmodel, batches=(1,), device=cfg.device, budget_s=0.5, threads=cfg.threads)))
    entries = [("e2e-tiny", "preset:tiny", 128, 64, 3.0)]
    if cfg.suite == "full":
        entries.append(("e2e-1.3b", "preset:mamba2-1.3b", 128, 32, 10.0))
    for name, model, P, G, floor in entries:
        log(f"{name}: {model}")
        out[name] = run_e2e(E2EConfig(model=model, random_init=True, variants=cfg.e2e_variants,
                                      prompt_len=P, gen_len=G, device=cfg.device,
                                      threads=cfg.threads, min_time_s=floor), log=log)
    return out


# history --------------------------------------------------------------------------------------------
def history_runs(hdir: Path) -> list[Path]:
    runs = hdir / "runs"
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def _violations(base: dict, new: dict, notes: list, **kw) -> set[tuple] | str:
    """Keys (variant, case, metric) where new regresses vs base, or why they cannot be compared."""
    try:
        c = compare(base, new, **kw)
    except DfplanError as e:
        return str(e)
    notes += [n for n in c.notes if n.startswith("busy machine") and n not in notes]
    return {(r.variant, r.case, r.metric) for r in c.regressions}


def consecutive_flags(series: list[dict], **kw) -> tuple[set[tuple], list[str]]:
    """Regressions of the newest result: keys where BOTH of the last two results violate
    against the result before them. Returns (flagged keys, notes)."""
    if len(series) < 3:
        return set(), [f"{len(series)} run(s) in the history: two consecutive violations need 3"]
    base, prev, last = series[-3], series[-2], series[-1]
    notes: list[str] = []
    a, b = _violations(base, prev, notes, **kw), _violations(base, last, notes, **kw)
    resets = [f"baseline reset: {x}" for x in (a, b) if isinstance(x, str)]
    if resets:
        return set(), notes + resets
    single = b - a
    if single:
        notes.append("violating once (flagged if the next run violates too): "
                     + ", ".join("/".join(k) for k in sorted(single)))
    return a & b, notes


def append_run(hdir: Path, results: dict[str, dict]) -> Path:
    any_res = next(iter(results.values()))
    commit = (any_res["git"].get("commit") or "nogit")[:8]
    d = hdir / "runs" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{commit}"
    n = 1
    while d.exists():
        d = d.with_name(f"{d.name}-{n}")
        n += 1
    d.mkdir(parents=True)
    for name, res in results.items():
        schema.save(res, d / f"{name}.json")
    return d


def load_series(hdir: Path, name: str) -> list[dict]:
    out = []
    for run in history_runs(hdir):
        f = run / f"{name}.json"
        if f.exists():
            out.append(schema.load(f))
    return out


def nightly_step(hdir: str | Path, results: dict[str, dict]) -> dict:
    """Append `results` to the history, flag consecutive regressions, write summary + plot."""
    hdir = Path(hdir)
    run_dir = append_run(hdir, results)
    report = {"run": run_dir.name, "flagged": {}, "notes": {}}
    for name in results:
        series = load_series(hdir, name)
        flags, notes = consecutive_flags(series)
        report["flagged"][name] = sorted("/".join(k) for k in flags)
        report["notes"][name] = notes
    write_summary(hdir, results, report)
    return report


# summary ---------------------------------------------------------------------------------------------
def _trend_plot(hdir: Path, names: list[str]) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = [n for n in names if n.startswith("e2e")]
    if not e2e:
        return None
    fig, axes = plt.subplots(len(e2e), 1, figsize=(8, 3.2 * len(e2e)), squeeze=False)
    for ax, name in zip(axes[:, 0], e2e):
        series = load_series(hdir, name)
        lines: dict[str, list] = {}
        for i, res in enumerate(series):
            for v, entry in res["variants"].items():
                c = (entry.get("cases") or {}).get("b1") if entry["status"] == "ok" else None
                if c and c.get("status") == "ok":
                    lines.setdefault(v, []).append((i, c["metrics"]["decode_ms_per_token"]["median"]))
        for v, pts in sorted(lines.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=v)
        ax.set_title(f"{name}: decode ms/token (batch 1, median)")
        ax.set_xlabel("run")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = hdir / "trend.png"
    tmp = hdir / ".trend.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_summary(hdir: Path, results: dict[str, dict], report: dict) -> Path:
    from tabulate import tabulate
    lines = [f"# Nightly benchmark {report['run']}", ""]
    flagged = {k: v for k, v in report["flagged"].items() if v}
    lines += ["**Regressions (two consecutive runs):** " +
              ("; ".join(f"{k}: {', '.join(v)}" for k, v in flagged.items()) if flagged else "none"), ""]
    for name, res in results.items():
        m = res["machine"]
        lines += [f"## {name}", "", f"commit {res['git'].get('commit')} (dirty: {res['git'].get('dirty')}), "
                  f"{m.get('cpu_model')}, load average {res.get('loadavg_after')}", ""]
        rows = []
        for v, e in res["variants"].items():
            if e["status"] != "ok":
                rows.append([v, "", e["status"], e.get("reason", "")[:60], "", ""])
                continue
            for c in e["cases"].values():
                if c.get("status") != "ok":
                    continue
                met = c["metrics"]
                t = met.get("decode_ms_per_token") or met.get("ms")
                rows.append([v, c["batch"], f'{t["median"]:.3f}',
                             f'{met["prefill_ms"]["median"]:.1f}' if "prefill_ms" in met else "",
                             f'{e.get("model_bytes", 0) / 1e6:.2f}',
                             f'{(e.get("peak_rss_bytes") or 0) / 1e6:.0f}'])
        lines += [tabulate(rows, ["variant", "batch", "ms (decode/token or call)", "prefill ms", "MB",
                                  "peak RSS MB"], tablefmt="github"), ""]
        lines += [f"- {n}" for n in report["notes"].get(name, [])] + [""]
    plot = _trend_plot(hdir, list(results))
    if plot:
        lines += ["![trend](trend.png)", ""]
    path = hdir / "summary.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def run_nightly(cfg: NightlyConfig, log=print) -> dict:
    hdir = Path(cfg.history)
    if hdir.exists() and not hdir.is_dir():
        raise DfplanError(f"--history {hdir} exists and is not a directory")
    for name in ("kernels", "e2e-tiny", "e2e-1.3b"):   # refuse a corrupt history before hours of work
        load_series(hdir, name)
    results = run_suite(cfg, log=log)
    return nightly_step(hdir, results)
