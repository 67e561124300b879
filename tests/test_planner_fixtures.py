"""Shared helpers for the planner tests: small configs and synthetic sensitivity tables.

(No tests here; the planner tests import these. Tables are synthesized, never read from
another stage's outputs.)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dfplan.config import Mamba2Config
from dfplan.formats.specs import DEFAULT_CANDIDATES
from dfplan.formats.units import compressible_units
from dfplan.planner.prior import nominal_error
from dfplan.planner.space import candidate_specs

COLUMNS = ["unit", "kind", "block", "spec", "bytes", "params", "kl", "rkl", "dce", "mse", "cos", "sqnr",
           "n_tokens", "seed", "calib"]


def micro_cfg(**kw) -> Mamba2Config:
    """2 layers, d_model 64: 5 units, small enough to enumerate every plan."""
    base = dict(d_model=64, n_layer=2, vocab_size=500, d_state=16, headdim=16, chunk_size=16, name="micro")
    base.update(kw)
    return Mamba2Config(**base)


def hybrid_cfg() -> Mamba2Config:
    """Every unit kind: Mamba mixers, an attention layer, MLPs and an untied lm_head."""
    return micro_cfg(n_layer=3, attn_layer_idx=(1,), attn_cfg={"num_heads": 4}, d_intermediate=96,
                     tie_embeddings=False, name="hybrid")


def synth_rows(cfg: Mamba2Config, seed: int = 0, candidates=DEFAULT_CANDIDATES, n_seeds: int = 1) -> list[dict]:
    """Plausible per-unit KL: a per-unit sensitivity times the format's nominal error, with
    multiplicative noise so units differ (and the MILP has real choices to make)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in compressible_units(cfg):
        w = float(rng.uniform(0.2, 3.0)) * (20.0 if u.kind in ("embedding", "lm_head") else 1.0)
        for s in candidate_specs(u, candidates):
            for k in range(n_seeds):
                kl = w * nominal_error(s, u.shape) * float(np.exp(0.3 * rng.normal()))
                rows.append({"unit": u.name, "kind": u.kind, "block": u.block, "spec": s.name,
                             "bytes": s.nbytes(u.shape), "params": u.numel, "kl": kl, "rkl": kl * 1.1,
                             "dce": kl * 0.9, "mse": kl * 3, "cos": 1 - kl, "sqnr": 20.0,
                             "n_tokens": 1024, "seed": k, "calib": "synthetic"})
    return rows


def write_table(cfg: Mamba2Config, path: Path, seed: int = 0, rows: list[dict] | None = None,
                provenance: dict | None = None) -> Path:
    import pandas as pd

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows if rows is not None else synth_rows(cfg, seed), columns=COLUMNS).to_csv(path, index=False)
    prov = provenance if provenance is not None else {
        "format": "dfplan-sensitivity", "version": 1,
        "model": {"arg": "synthetic", "config": cfg.to_mamba_ssm_dict()},
        "calibration": {"windows": 4, "seq_len": 32, "seed": 0}}
    path.with_suffix(".json").write_text(json.dumps(prov))
    return path


def write_model_dir(cfg: Mamba2Config, d: Path) -> Path:
    """A checkpoint folder with only config.json: enough for search (no weights needed)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    return d


def brute_force(space, sur, budget: int):
    """Exhaustive optimum of the additive problem -> (kl, bytes), by broadcasting over all plans."""
    kl = np.zeros(())
    nb = np.zeros((), dtype=np.int64)
    for i, u in enumerate(space.units):
        shape = [1] * len(space.units)
        shape[i] = len(u.specs)
        kl = kl + np.array([sur.unit_kl(u.unit.name, s) for s in u.specs]).reshape(shape)
        nb = nb + np.array(u.nbytes, dtype=np.int64).reshape(shape)
    nb = nb + space.fixed_bytes
    ok = nb <= budget
    if not ok.any():
        return None
    j = np.argmin(np.where(ok, kl, np.inf))
    return float(kl.flat[j]), int(nb.flat[j])
