"""Does the table rank layers the way true perplexity does?

For a seeded sample of (unit, spec) rows, compress that unit alone and measure held-out
perplexity with the plain full forward `dfplan eval` uses (none of the analyzer's caching),
then report the Spearman rank correlation of every metric with the true change: pooled
over all sampled rows and within each format (the layer ranking a planner relies on).
Then the planner's use: at one coarse format, compress together the k units each metric
calls safest (and riskiest) and measure that perplexity too; a metric that ranks well gives
the smallest change for its safest set and the largest for its riskiest. A seeded random
pick is the baseline. KL Lens claims KL beats MSE/SQNR at this; this checks it on our model.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from tqdm.auto import tqdm

from dfplan.data import VALID_FRACTION, heldout_windows
from dfplan.errors import DfplanError
from dfplan.evaluate import perplexity
from dfplan.fileio import write_json_atomic, write_text_atomic
from dfplan.formats.specs import parse_spec
from dfplan.formats.units import unit_index

from .analyzer import compressed
from .calib import corpus_tokens
from .metrics import METRICS, damage
from .run import load_teacher, load_text_tokenizer
from .table import read_provenance, read_table

RANKERS = (*METRICS, "random")


def _rho(x, y) -> tuple[float | None, float | None]:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(y) & ~np.isnan(x)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return None, None
    r = spearmanr(x, y)
    rho, p = float(r.statistic), float(r.pvalue)
    return (None if math.isnan(rho) else rho), (None if math.isnan(p) else p)


def _finite(x):
    """inf SQNR (exact weights) ranks as 'no damage'; keep it ordered without breaking the JSON."""
    return np.where(np.isposinf(x), 1e300, np.where(np.isneginf(x), -1e300, x))


def _coarsest_spec(df: pd.DataFrame) -> str:
    lin = df[~df["kind"].isin(["embedding", "lm_head"])]
    if lin.empty:
        raise DfplanError("the table has no linear units to compress together; pass --joint-spec")
    return str(lin.groupby("spec")["kl"].mean().idxmax())


def validate_table(model, table: pd.DataFrame, heldout, *, sample: int = 48, top_k=(2, 4),
                   joint_spec: str | None = None, seed: int = 0, batch_windows: int = 8,
                   progress: bool = False) -> dict:
    t0 = time.perf_counter()
    cfg = model.config
    index = unit_index(cfg)
    df = table[table["unit"].isin(index)].reset_index(drop=True)
    if df.empty:
        raise DfplanError("no unit of the sensitivity table belongs to this model; was it computed for another one?")
    V = cfg.vocab_size

    def ppl() -> tuple[float, float]:
        r = perplexity(model, heldout, batch_windows, vocab_size=V)
        return r.nll, r.ppl

    base_nll, base_ppl = ppl()
    forwards = 1
    rng = np.random.default_rng(seed)
    idx = np.arange(len(df)) if not sample or sample >= len(df) else np.sort(rng.choice(len(df), sample, replace=False))
    meas = df.iloc[idx].reset_index(drop=True).copy()
    dnll, dppl = [], []
    for _, row in tqdm(meas.iterrows(), total=len(meas), disable=not progress, desc="validate", unit="row"):
        with compressed(model, {row["unit"]: parse_spec(row["spec"])}, seed=int(row.get("seed", 0))):
            nll, p = ppl()
        forwards += 1
        dnll.append(nll - base_nll)
        dppl.append(p - base_ppl)
    meas["true_dnll"], meas["true_dppl"] = dnll, dppl

    pooled, within = {}, {}
    for m in METRICS:
        x = damage(m, _finite(meas[m].to_numpy(dtype=float)))
        rho, p = _rho(x, meas["true_dppl"])
        pooled[m] = {"rho": rho, "p": p}
        per = []
        for _, g in meas.groupby("spec"):
            r, _ = _rho(damage(m, _finite(g[m].to_numpy(dtype=float))), g["true_dppl"])
            if r is not None:
                per.append(r)
        within[m] = {"mean_rho": float(np.mean(per)) if per else None, "n_specs": len(per)}

    joint = _joint(model, df, joint_spec, top_k, seed, ppl, base_ppl, progress)
    forwards += joint.pop("_forwards")
    return {
        "baseline": {"nll": base_nll, "ppl": base_ppl, "heldout_windows": int(np.asarray(heldout).shape[0]),
                     "heldout_tokens": int(np.asarray(heldout).shape[0] * (np.asarray(heldout).shape[1] - 1))},
        "n_rows": len(meas), "n_table_rows": len(df),
        "spearman": pooled, "spearman_within_spec": within, "joint": joint,
        "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                 for r in meas[["unit", "kind", "block", "spec", *METRICS, "true_dnll", "true_dppl"]]
                 .to_dict(orient="records")],
        "cost": {"wall_s": round(time.perf_counter() - t0, 3), "full_forwards": forwards},
    }


def _joint(model, df, joint_spec, top_k, seed, ppl, base_ppl, progress) -> dict:
    spec = joint_spec or _coarsest_spec(df)
    parse_spec(spec)
    cand = df[df["spec"] == spec].reset_index(drop=True)
    if cand.empty:
        raise DfplanError(f"--joint-spec {spec} has no rows in the table; pick one of {sorted(df['spec'].unique())}")
    ks = sorted({k for k in top_k if k <= len(cand)})
    rng = np.random.default_rng(seed + 1)
    random_order = rng.permutation(len(cand))
    measured: dict[frozenset, float] = {}
    sets = []
    work = []
    for m in RANKERS:
        if m == "random":
            order = random_order
        else:
            # stable sort: ties keep model order, so every metric breaks ties the same way
            order = np.argsort(damage(m, _finite(cand[m].to_numpy(dtype=float))), kind="stable")
        for k in ks:
            for which, pick in (("safest", order[:k]), ("riskiest", order[::-1][:k])):
                if m == "random" and which == "riskiest":
                    continue
                units = [cand["unit"][i] for i in pick]
                work.append((m, k, which, units, float(cand["kl"][list(pick)].sum())))
    for m, k, which, units, pred in tqdm(work, disable=not progress, desc="validate top-k", unit="set"):
        key = frozenset(units)
        if key not in measured:
            with compressed(model, {u: parse_spec(spec) for u in units}, seed=seed):
                measured[key] = ppl()[1] - base_ppl
        sets.append({"metric": m, "k": k, "which": which, "units": units, "sum_kl": pred, "true_dppl": measured[key]})
    return {"spec": spec, "k": ks, "sets": sets, "_forwards": len(measured)}


def markdown(res: dict) -> str:
    from tabulate import tabulate
    j = res["joint"]
    by = {(s["metric"], s["k"], s["which"]): s["true_dppl"] for s in j["sets"]}
    head = ["metric", "Spearman (all rows)", "p", "mean within-format"]
    head += [f"safest {k} dppl" for k in j["k"]] + [f"riskiest {k} dppl" for k in j["k"]]
    rows = []
    for m in RANKERS:
        if m == "random":
            r = ["random", "", "", ""]
        else:
            sp, w = res["spearman"][m], res["spearman_within_spec"][m]
            f = lambda v, fmt: "n/a" if v is None else format(v, fmt)
            r = [m, f(sp["rho"], "+.3f"), f(sp["p"], ".2g"), f(w["mean_rho"], "+.3f")]
        r += [f"{by.get((m, k, 'safest'), float('nan')):.4g}" for k in j["k"]]
        r += [("" if m == "random" else f"{by.get((m, k, 'riskiest'), float('nan')):.4g}") for k in j["k"]]
        rows.append(r)
    b = res["baseline"]
    title = (f"Held-out ppl {b['ppl']:.4g} on {b['heldout_tokens']} tokens; {res['n_rows']} (unit, spec) rows "
             f"measured; top-k sets at {j['spec']}. Orientation: larger score = more damage (cos, sqnr negated).")
    return title + "\n\n" + tabulate(rows, headers=head, tablefmt="github") + "\n"


@dataclass(frozen=True)
class ValidateOptions:
    model: str
    corpus: tuple
    table: str
    out: str
    tokenizer: str | None = None
    sample: int = 48
    top_k: tuple = (2, 4)
    joint_spec: str | None = None
    heldout_windows: int = 16
    seq_len: int | None = None
    seed: int | None = None
    batch_windows: int = 8
    threads: int | None = None


def run_validation(opts: ValidateOptions) -> dict:
    import torch

    if not str(opts.out).lower().endswith(".json"):
        raise DfplanError(f"--out {opts.out} must name a .json file (the markdown table goes beside it)")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    table = read_table(opts.table)
    prov = read_provenance(opts.table)
    cal = prov.get("calibration", {})
    seq_len = opts.seq_len or int(cal.get("seq_len", 256))
    seed = opts.seed if opts.seed is not None else int(cal.get("seed", 0))
    model, tok = load_teacher(opts.model, bool(prov.get("model", {}).get("random_init", False)), seed)
    tok = load_text_tokenizer(tok, opts.tokenizer, opts.model)
    stream = corpus_tokens(opts.corpus, tok, model.config)
    held = heldout_windows(stream.tokens, seq_len, opts.heldout_windows, seed, cal.get("valid_fraction", VALID_FRACTION))
    res = validate_table(model, table, held, sample=opts.sample, top_k=opts.top_k, joint_spec=opts.joint_spec,
                         seed=seed, batch_windows=opts.batch_windows, progress=True)
    res["provenance"] = {"model": opts.model, "table": str(opts.table), "corpus": list(stream.files),
                         "token_stream_key": stream.key, "seq_len": seq_len, "seed": seed,
                         "heldout_disjoint_from_calibration": cal.get("token_stream_key") == stream.key
                         and cal.get("seq_len") == seq_len and cal.get("seed") == seed}
    md = markdown(res)
    write_json_atomic(opts.out, res)
    write_text_atomic(Path(opts.out).with_suffix(".md"), md)
    res["markdown"] = md
    return res
