"""Predicted KL of a plan: the sum of per-unit KL from the sensitivity table, optionally corrected.

Additive model: compressing unit u to spec s alone moves the next-token distribution by
kl[u, s] (nats, measured by the sensitivity analyzer); a plan's predicted KL is the sum over
units. Real damage compounds, so the sum is usually off by a roughly constant factor and
curvature. `fit_correction` fits  measured ~= scale * additive ** power  (least squares in
log space; power = 1 gives a pure scale) on plans whose KL was actually measured.
The correction is monotone increasing, so the plan that minimises the additive sum under a
budget also minimises the corrected prediction: the MILP stays exact, and the correction
only changes the predicted number and tells how far to trust it (`Tracking`).

Units: KL in nats per token; a table may hold several seeds per (unit, spec), which are
averaged; tiny negative KL from float noise is clipped to 0.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.fileio import sha256_file
from dfplan.formats.plan import same_vocab_rows
from dfplan.formats.specs import Keep, Spec, parse_spec
from dfplan.formats.units import compressible_units

REQUIRED_COLUMNS = ("unit", "kind", "block", "spec", "bytes", "kl")
# the reference format: the teacher itself in fp16 (for fp16/bf16/fp32 teachers it is ~lossless)
REFERENCE = Keep("fp16")


@dataclass(frozen=True)
class Correction:
    """measured ~= scale * additive ** power."""
    scale: float = 1.0
    power: float = 1.0

    def __call__(self, additive: float) -> float:
        return self.scale * max(float(additive), 0.0) ** self.power

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.power == 1.0

    def to_dict(self) -> dict:
        return {"scale": self.scale, "power": self.power}


@dataclass(frozen=True)
class Tracking:
    """How well predictions track measured KL on n plans (after the correction)."""
    n: int
    spearman: float            # rank agreement, what matters for choosing plans
    pearson_log: float         # correlation of log KL
    median_rel_err: float      # median |pred - meas| / meas
    max_rel_err: float
    raw_median_rel_err: float  # the same for the plain additive sum

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Surrogate:
    kl: dict                                    # unit name -> {spec name: KL (nats)}
    source: str = "sensitivity"                 # "sensitivity" | "prior"
    correction: Correction = Correction()
    provenance: dict = field(default_factory=dict)

    def unit_kl(self, unit: str, spec: Spec | str) -> float:
        name = spec if isinstance(spec, str) else spec.name
        try:
            return self.kl[unit][name]
        except KeyError:
            raise DfplanError(f"no KL for {unit} at {name}; the table did not measure it") from None

    def candidates(self) -> dict[str, list[Spec]]:
        """unit -> the specs this surrogate can score (the search space's candidates)."""
        return {u: [parse_spec(s) for s in d] for u, d in self.kl.items()}

    def additive(self, assignment: Mapping[str, Spec | str]) -> float:
        return float(sum(self.unit_kl(u, s) for u, s in assignment.items()))

    def predict(self, assignment: Mapping[str, Spec | str]) -> float:
        return self.correction(self.additive(assignment))

    def with_correction(self, c: Correction) -> "Surrogate":
        from dataclasses import replace
        return replace(self, correction=c)


# -- reading a sensitivity table -------------------------------------------------------------

def load_table(path: str | Path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DfplanError(f"sensitivity table {path} does not exist; run `dfplan sensitivity --out {path}` "
                          f"first, or pass --sensitivity PATH")
    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as e:   # pandas raises many types for malformed files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DfplanError(f"cannot read sensitivity table {path}: {first}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DfplanError(f"{path} is not a sensitivity table (missing columns {missing})")
    if df.empty:
        raise DfplanError(f"sensitivity table {path} has no rows")
    return df


def surrogate_from_table(df, cfg: Mamba2Config, where: str = "sensitivity table") -> Surrogate:
    """Validate a unit table against the model and average it into unit -> spec -> KL.

    The table must name exactly the model's compressible units, with their kind and block, and
    its `bytes` column must equal spec.nbytes(unit.shape): a table from another model (other
    layer count, width or vocabulary) is refused with the first mismatch named."""
    units = {u.name: u for u in compressible_units(cfg)}
    names = set(df["unit"].astype(str))
    extra = sorted(names - set(units))
    missing = [n for n in units if n not in names]
    if extra or missing:
        parts = []
        if extra:
            parts.append(f"{len(extra)} unit(s) the model lacks (e.g. {extra[0]})")
        if missing:
            parts.append(f"no rows for {len(missing)} of the model's units (e.g. {missing[0]})")
        raise DfplanError(f"{where} does not match model {cfg.name}: " + "; ".join(parts) +
                          "; was it measured on another model? rerun `dfplan sensitivity` for this one")
    kl: dict[str, dict[str, list[float]]] = {n: {} for n in units}
    for row in df[list(REQUIRED_COLUMNS)].itertuples(index=False):
        u = units[str(row.unit)]
        try:
            spec = parse_spec(str(row.spec))
        except DfplanError as e:
            raise DfplanError(f"{where}: row for {u.name}, format {row.spec!r}: {e}") from None
        if str(row.kind) != u.kind or int(row.block) != u.block:
            raise DfplanError(f"{where} does not match model {cfg.name}: {u.name} is kind={row.kind} "
                              f"block={row.block} in the table but kind={u.kind} block={u.block} in the model")
        try:
            want = spec.nbytes(u.shape)
        except DfplanError as e:
            raise DfplanError(f"{where} does not match model {cfg.name}: {u.name} {spec}: {e}") from None
        if int(row.bytes) != want:
            raise DfplanError(f"{where} does not match model {cfg.name}: {u.name} at {spec} is "
                              f"{int(row.bytes):,} bytes in the table but {want:,} for shape {u.shape}; "
                              f"was it measured on another model?")
        v = float(row.kl)
        if not math.isfinite(v):
            raise DfplanError(f"{where}: KL of {u.name} at {spec} is {v}; rerun the sensitivity analysis")
        kl[u.name].setdefault(spec.name, []).append(v)
    out = {}
    for n, d in kl.items():
        m = {s: max(0.0, float(np.mean(v))) for s, v in d.items()}
        # the reference format is the teacher itself; if not measured, it costs nothing
        m.setdefault(REFERENCE.name, 0.0)
        out[n] = m
    return Surrogate(out, source="sensitivity")


def check_provenance(prov: dict, cfg: Mamba2Config, where: str) -> None:
    """Refuse a table whose recorded model config disagrees with `cfg` (when it records one)."""
    rec = None
    for key in ("model_config", "config"):
        if isinstance(prov.get(key), dict):
            rec = prov[key]
            break
    if rec is None and isinstance(prov.get("model"), dict):
        m = prov["model"]
        rec = m.get("config") if isinstance(m.get("config"), dict) else m
    if not rec:
        return
    # vocab_size by embedding rows: a preset and its transformers-layout copy (which stores
    # the padded count) are the same model (dfplan/formats/plan.py same_vocab_rows)
    diffs = [f"{k}={rec[k]} (table) vs {getattr(cfg, k)} (model)" for k in ("d_model", "n_layer", "vocab_size")
             if k in rec and (not same_vocab_rows(rec[k], cfg) if k == "vocab_size" else rec[k] != getattr(cfg, k))]
    if diffs:
        raise DfplanError(f"{where} was measured on another model: " + "; ".join(diffs))


def load_surrogate(path: str | Path, cfg: Mamba2Config) -> Surrogate:
    """Read, validate and average a sensitivity table (+ its sensitivity.json provenance)."""
    path = Path(path)
    df = load_table(path)
    prov_path = path.with_suffix(".json")
    prov = {}
    if prov_path.is_file():
        try:
            prov = json.loads(prov_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DfplanError(f"malformed sensitivity provenance {prov_path}: {e}") from None
        if isinstance(prov, dict):
            check_provenance(prov, cfg, str(path))
    sur = surrogate_from_table(df, cfg, where=str(path))
    keep = {}
    if isinstance(prov, dict):
        m = prov.get("model") if isinstance(prov.get("model"), dict) else {}
        keep["model"] = {k: m[k] for k in ("arg", "config_sha256", "weights_sha256", "dtype") if k in m}
        c = prov.get("calibration") if isinstance(prov.get("calibration"), dict) else {}
        keep["calibration"] = {k: c[k] for k in ("windows", "seq_len", "seed", "valid_fraction", "windows_sha256")
                               if k in c}
        if "git_commit" in prov:
            keep["git_commit"] = prov["git_commit"]
    return Surrogate(sur.kl, source="sensitivity",
                     provenance={"table": str(path), "table_sha256": sha256_file(path), **keep})


# -- correction on measured plans --------------------------------------------------------------

def fit_correction(additive: Sequence[float], measured: Sequence[float], power: bool = True) -> Correction:
    """Fit measured ~= scale * additive ** power on plans with both values > 0.

    Three candidates: none (scale 1, power 1), a scale alone (the median of measured / additive,
    robust to a few outliers), and scale with power (least squares on log values, >= 3 plans,
    power clipped to [0.25, 4]); the one with the smallest median relative error wins, so the
    correction never tracks the measurements worse than the plain sum does."""
    a = np.asarray(additive, dtype=float)
    m = np.asarray(measured, dtype=float)
    ok = (a > 0) & (m > 0) & np.isfinite(a) & np.isfinite(m)
    a, m = a[ok], m[ok]
    if a.size == 0:
        return Correction()
    cands = [Correction(), Correction(scale=float(np.median(m / a)))]
    la, lm = np.log(a), np.log(m)
    if power and a.size >= 3 and np.ptp(la) > 1e-9:
        p = float(np.clip(np.polyfit(la, lm, 1)[0], 0.25, 4.0))
        cands.append(Correction(scale=float(math.exp(np.mean(lm - p * la))), power=p))

    def med_err(c: Correction) -> float:
        return float(np.median(np.abs(c.scale * a ** c.power - m) / m))
    return min(cands, key=med_err)


def tracking(additive: Sequence[float], measured: Sequence[float], corr: Correction) -> Tracking:
    from scipy.stats import pearsonr, spearmanr

    a = np.asarray(additive, dtype=float)
    m = np.asarray(measured, dtype=float)
    pred = np.array([corr(x) for x in a])
    pos = m > 0
    rel = np.abs(pred[pos] - m[pos]) / m[pos]
    raw = np.abs(a[pos] - m[pos]) / m[pos]
    nan = float("nan")
    sp = pl = nan
    if a.size >= 3 and np.ptp(a) > 0 and np.ptp(m) > 0:
        sp = float(spearmanr(a, m).statistic)
        both = (a > 0) & (m > 0)
        if both.sum() >= 3 and np.ptp(np.log(a[both])) > 0 and np.ptp(np.log(m[both])) > 0:
            pl = float(pearsonr(np.log(a[both]), np.log(m[both])).statistic)
    return Tracking(n=int(a.size), spearman=sp, pearson_log=pl,
                    median_rel_err=float(np.median(rel)) if rel.size else nan,
                    max_rel_err=float(np.max(rel)) if rel.size else nan,
                    raw_median_rel_err=float(np.median(raw)) if raw.size else nan)
