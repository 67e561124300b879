"""`dfplan bench compare BASE NEW`: ratios, a Mann-Whitney U test, and a regression verdict.

A timing regresses when NEW's median is >= `time_threshold` (10%) slower AND the one-sided
Mann-Whitney U test on the raw samples says NEW is slower with p < `alpha`; a timing without
raw samples (kernel medians) can only be judged by its ratio, and is marked so. Model bytes
and peak memory regress when >= `size_threshold` (2%) larger. Results from different
machines, benchmark versions or parameters are refused with a message (a new baseline is
needed), never turned into a false regression.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from dfplan.errors import DfplanError

from . import schema

# peak RSS over the worker's baseline (libraries loaded): the total also counts shared-library
# pages, which move by tens of MB between identical runs
SIZE_FIELDS = ("model_bytes", "peak_rss_over_base_bytes", "peak_gpu_bytes")
MEMORY_FLOOR = 16 << 20     # allocator arenas / page granularity: smaller memory moves are noise
# parameters that change what is measured (progress bars, sample counts and paths do not)
SAME_PARAMS = ("model", "model_name", "random_init", "prompt_len", "gen_len", "device", "threads",
               "seed", "plan", "units", "impls", "bandwidth_mib", "isolate")


@dataclass
class Row:
    variant: str
    case: str
    metric: str
    base: float
    new: float
    ratio: float
    p_value: float | None
    regression: bool
    note: str = ""


@dataclass
class Comparison:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]

    def to_json(self) -> dict:
        return {"rows": [r.__dict__ for r in self.rows], "notes": self.notes,
                "regressions": len(self.regressions)}


def comparable(base: dict, new: dict) -> None:
    """Raise DfplanError unless the two results measure the same thing on the same machine."""
    if base["benchmark"] != new["benchmark"]:
        raise DfplanError(f"cannot compare a {base['benchmark']!r} result with a {new['benchmark']!r} one")
    if base["bench_version"] != new["bench_version"]:
        raise DfplanError(f"benchmark version changed ({base['bench_version']} -> {new['bench_version']}): "
                          f"the numbers are not comparable; start a new baseline")
    kb, kn = schema.machine_key(base["machine"]), schema.machine_key(new["machine"])
    diff = [f"{k}: {kb[k]!r} vs {kn[k]!r}" for k in kb if kb[k] != kn.get(k)]
    if diff:
        raise DfplanError("results come from different machines (" + "; ".join(diff) +
                          "); compare runs from one machine, or start a new baseline there")
    pb, pn = base["params"], new["params"]
    diff = [f"{k}: {pb.get(k)!r} vs {pn.get(k)!r}" for k in SAME_PARAMS if pb.get(k) != pn.get(k)]
    if diff:
        raise DfplanError("results were run with different parameters (" + "; ".join(diff) +
                          "); start a new baseline")


def _mwu_greater(new: list[float], base: list[float]) -> float | None:
    """p-value of 'new is stochastically greater (slower) than base'."""
    if len(new) < 3 or len(base) < 3:
        return None
    from scipy.stats import mannwhitneyu
    return float(mannwhitneyu(new, base, alternative="greater").pvalue)


def compare(base: dict, new: dict, time_threshold: float = 0.10, size_threshold: float = 0.02,
            alpha: float = 0.01, allow_busy: bool = False) -> Comparison:
    """allow_busy: judge timings even when either run shared the machine with other work
    (its load average exceeded the CPU count); by default such timings are shown, not judged."""
    comparable(base, new)
    out = Comparison()
    busy = [f"{which}: {why}" for which, r in (("BASE", base), ("NEW", new)) if (why := schema.busy(r))]
    judge_time = allow_busy or not busy
    if busy:
        out.notes.append("busy machine (" + "; ".join(busy) + "): timings "
                         + ("judged anyway (--allow-busy)" if allow_busy else
                            "not judged, sizes only; re-run on an idle machine or pass --allow-busy"))
    bv, nv = base["variants"], new["variants"]
    for name in sorted(set(bv) | set(nv)):
        b, n = bv.get(name), nv.get(name)
        if b is None or n is None:
            out.notes.append(f"{name}: only in {'NEW' if b is None else 'BASE'}")
            continue
        if b["status"] != "ok" or n["status"] != "ok":
            if b["status"] == "ok" and n["status"] == "failed":
                out.rows.append(Row(name, "-", "status", 1, 0, math.inf, None, True,
                                    f"ran in BASE, failed in NEW: {n.get('reason')}"))
            else:
                out.notes.append(f"{name}: {b['status']} in BASE, {n['status']} in NEW "
                                 f"({n.get('reason') or b.get('reason')})")
            continue
        for f in SIZE_FIELDS:
            x, y = b.get(f), n.get(f)
            if x and y:
                r = y / x
                bad = r >= 1 + size_threshold and (f == "model_bytes" or y - x >= MEMORY_FLOOR)
                out.rows.append(Row(name, "-", f, x, y, r, None, bad))
        for cname in sorted(set(b["cases"]) | set(n["cases"])):
            cb, cn = b["cases"].get(cname), n["cases"].get(cname)
            if not cb or not cn or cb.get("status") != "ok" or cn.get("status") != "ok":
                out.notes.append(f"{name} {cname}: not run in both")
                continue
            for metric in sorted(set(cb["metrics"]) & set(cn["metrics"])):
                mb, mn = cb["metrics"][metric], cn["metrics"][metric]
                r = mn["median"] / mb["median"] if mb["median"] > 0 else math.inf
                p = _mwu_greater(mn.get("samples") or [], mb.get("samples") or [])
                slower = r >= 1 + time_threshold and (p is None or p < alpha)
                note = "" if p is not None else "no raw samples: ratio only"
                if slower and not judge_time:
                    note = "slower, not judged: busy machine"
                out.rows.append(Row(name, cname, metric, mb["median"], mn["median"], r, p,
                                    slower and judge_time, note))
    return out


def compare_files(base_path, new_path, **kw) -> Comparison:
    return compare(schema.load(base_path), schema.load(new_path), **kw)


def format_comparison(c: Comparison) -> str:
    from tabulate import tabulate
    head = ["variant", "case", "metric", "base", "new", "new/base", "p (slower)", "verdict"]
    body = [[r.variant, r.case, r.metric, f"{r.base:.4g}", f"{r.new:.4g}", f"{r.ratio:.3f}",
             "" if r.p_value is None else f"{r.p_value:.2g}",
             ("REGRESSION" if r.regression else "ok") + (f" ({r.note})" if r.note else "")]
            for r in c.rows]
    lines = [tabulate(body, head, tablefmt="github")] + c.notes
    lines.append(f"{len(c.regressions)} regression(s)")
    return "\n".join(lines)
