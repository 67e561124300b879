"""`dfplan pack` as a library function: model + plan -> packed artifact, no distillation.

For size and speed work (random-init presets included). Corrections start from a
randomised low-rank SVD (torch.svd_lowrank) unless exact_svd; the payload written equals
`dfplan size` for the same model and plan to the byte (checked here, and in the tests).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import DfplanError


def pack(model_arg: str, plan_arg: str, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
         seed: int = 0, exact_svd: bool = False, progress: bool = True) -> dict:
    from ..formats.size import plan_bytes
    from ..packed import MANIFEST
    from .api import compress, load, resolve_plan, save_packed

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise DfplanError(f"{out} exists and is not an (empty or packed) directory; choose another --out")
    t0 = time.perf_counter()
    m = load(model_arg, tokenizer=tokenizer, seed=seed)
    if m.plan is not None:
        raise DfplanError(f"{model_arg} is already packed; pack an uncompressed checkpoint or preset")
    plan = resolve_plan(plan_arg, m.config)               # errors before any quantisation
    expected = plan_bytes(m.config, plan).total_bytes
    t_load = time.perf_counter() - t0
    compress(m, plan, seed=seed, fast_svd=not exact_svd, progress=progress)
    t_quant = time.perf_counter() - t0 - t_load
    save_packed(m, out)
    import json
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest["payload_bytes"] != expected:             # specs.py and the modules disagree
        raise RuntimeError(f"payload {manifest['payload_bytes']} B != dfplan size {expected} B")
    return {"out": str(out), "model": model_arg, "plan": str(plan_arg),
            "payload_bytes": manifest["payload_bytes"], "size_bytes": expected,
            "weights_file_bytes": manifest["files"]["model.safetensors"]["bytes"],
            "load_s": t_load, "quantize_s": t_quant, "total_s": time.perf_counter() - t0,
            "lowrank_init": "exact" if exact_svd else "randomized"}
