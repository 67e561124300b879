"""The sensitivity table on disk: what the planner reads.

Files written beside `--out run/sensitivity.csv`:
  sensitivity.csv / .parquet          one row per (unit, spec)
  sensitivity_blocks.csv / .parquet   one row per (block, spec): every unit of the block at that spec
  sensitivity.json                    provenance (model, calibration, settings, versions, cost)

Unit columns: unit, kind, block, spec (str(spec); parse_spec round-trips), bytes
(spec.nbytes(unit.shape)), params, kl, rkl, dce, mse, cos, sqnr, n_tokens, seed, calib
(short hash of the calibration windows; the full provenance is in the JSON).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dfplan.errors import DfplanError
from dfplan.fileio import atomic_path, write_json_atomic

from .metrics import METRICS

UNIT_COLUMNS = ["unit", "kind", "block", "spec", "bytes", "params", *METRICS, "n_tokens", "seed", "calib"]
BLOCK_COLUMNS = ["block", "units", "spec", "bytes", "params", *METRICS, "n_tokens", "seed", "calib"]


def output_paths(out: str | Path) -> dict[str, Path]:
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise DfplanError(f"--out {out} must name a .csv file (parquet and JSON are written beside it)")
    stem = out.with_suffix("")
    return {"csv": out, "parquet": stem.with_suffix(".parquet"), "json": stem.with_suffix(".json"),
            "blocks_csv": Path(f"{stem}_blocks.csv"), "blocks_parquet": Path(f"{stem}_blocks.parquet"),
            "partial": Path(f"{stem}.partial")}


def frame(rows: list[dict], columns: list[str], calib: str) -> pd.DataFrame:
    df = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    if df.empty:
        return pd.DataFrame(columns=columns)
    df["calib"] = calib
    return df[columns]


def write_tables(out: str | Path, units: pd.DataFrame, blocks: pd.DataFrame, provenance: dict) -> dict[str, Path]:
    """Write CSV + parquet + JSON atomically; -> the paths written."""
    paths = output_paths(out)
    for df, csv, pq in ((units, paths["csv"], paths["parquet"]),
                        (blocks, paths["blocks_csv"], paths["blocks_parquet"])):
        with atomic_path(csv) as tmp:
            df.to_csv(tmp, index=False)
        with atomic_path(pq) as tmp:
            df.to_parquet(tmp, index=False)
    write_json_atomic(paths["json"], provenance)
    return {k: v for k, v in paths.items() if k != "partial"}


def read_table(path: str | Path) -> pd.DataFrame:
    """Load a unit table (CSV or parquet) and check it has the columns the consumers need."""
    path = Path(path)
    if not path.is_file():
        raise DfplanError(f"sensitivity table {path} does not exist; run `dfplan sensitivity` first")
    try:
        df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    except Exception as e:  # pandas raises many types for malformed files
        raise DfplanError(f"cannot read sensitivity table {path}: {str(e).splitlines()[0]}") from None
    missing = [c for c in ("unit", "kind", "block", "spec", "bytes", *METRICS) if c not in df.columns]
    if missing:
        raise DfplanError(f"{path} is not a sensitivity table (missing columns {missing})")
    if df.empty:
        raise DfplanError(f"sensitivity table {path} has no rows")
    return df


def read_provenance(table_path: str | Path) -> dict:
    """The sensitivity.json beside a table, or {} when there is none."""
    p = Path(table_path).with_suffix(".json")
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DfplanError(f"malformed provenance {p}: {e}") from None
