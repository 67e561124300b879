"""`dfplan pack` as a library function: model + plan -> packed artifact, no distillation.

For size and speed work (random-init presets included). Corrections start from a
randomised low-rank SVD (torch.svd_lowrank) unless exact_svd; the payload written equals
`dfplan size` for the same model and plan to the byte (checked here, and in the tests).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..config import Mamba2Config
from ..errors import DfplanError
from ..formats.apply import apply_plan
from ..formats.modules import module_for
from ..formats.quant import lowrank_method
from ..formats.size import plan_bytes
from ..formats.units import compressible_units
from ..model import build_model, init_weights
from ..packed_files import CONFIG, MANIFEST, PLAN, TOKENIZER, WEIGHTS
from ..prompting import check_fits
from ..runfolder import is_temp_leftover
from ..tokenizer import check_vocab, load_tokenizer
from .api import Model, compress, load, resolve_plan, save_packed
from .heap import reuse_freed_memory


def random_compressed(cfg: Mamba2Config, plan, seed: int = 0, exact_svd: bool = False,
                      progress: bool = True):
    """A random-init model compressed under `plan` without ever holding the float model:
    the small tensors and Keep units are initialised as init_weights does; each compressed
    unit's weight is drawn (same distribution as init_weights) into one reused buffer per
    shape, quantised, and dropped. Peak memory ~ packed model + one float weight."""
    resolved = plan.resolve(cfg)
    skip = {u.name for u in compressible_units(cfg) if module_for(resolved[u.name], u.kind) is not None}
    model = build_model(cfg, device="meta").to_empty(device="cpu")   # untouched pages cost nothing
    # only now: the big empty weights above stay mmapped, so freeing them returns memory
    reuse_freed_memory()
    init_weights(model, seed, skip=skip)
    gen = torch.Generator().manual_seed(seed + 1)
    bufs: dict = {}
    n_res = 1 if cfg.d_intermediate == 0 else 2

    def weight_fn(u, mod):
        if u.shape not in bufs:
            bufs[u.shape] = torch.empty(u.shape)
        w = bufs[u.shape]
        if u.kind == "embedding":
            w.normal_(0.0, 0.02, generator=gen)
        else:
            bound = 1.0 / math.sqrt(u.shape[1])
            w.uniform_(-bound, bound, generator=gen)
            if u.name.endswith(("out_proj", "fc2")):
                w.div_(math.sqrt(n_res * cfg.n_layer))
        return w

    with lowrank_method("exact" if exact_svd else "randomized"):
        apply_plan(model, plan, generator=gen, progress=progress, weight_fn=weight_fn)
    return model.eval()


_PACKED_FILES = {WEIGHTS, CONFIG, PLAN, TOKENIZER, MANIFEST}


def pack(model_arg: str, plan_arg: str, out_dir: str | os.PathLike, *, tokenizer: str | None = None,
         seed: int = 0, exact_svd: bool = False, progress: bool = True) -> dict:
    out = Path(out_dir)
    # a folder holding only a packed checkpoint's files, finished or cut short by a kill, is ours
    if out.exists() and (not out.is_dir() or any(n not in _PACKED_FILES and not is_temp_leftover(n)
                                                 for n in os.listdir(out))):
        raise DfplanError(f"{out} exists and is not an (empty or packed) directory; choose another --out")
    t0 = time.perf_counter()
    if model_arg.startswith("preset:"):                   # streamed: never the float model
        cfg = Mamba2Config.preset(model_arg)
        plan = resolve_plan(plan_arg, cfg)
        expected = plan_bytes(cfg, plan).total_bytes
        check_fits(expected + 2 * 4 * max(math.prod(u.shape) for u in compressible_units(cfg)),
                   model_arg)
        tok = None
        if tokenizer is not None:
            tok = load_tokenizer(tokenizer)
            check_vocab(tok, cfg)
        t_load = time.perf_counter() - t0
        m = Model(random_compressed(cfg, plan, seed, exact_svd, progress), tok, source=model_arg)
    else:
        m = load(model_arg, tokenizer=tokenizer, seed=seed)
        if m.plan is not None:
            raise DfplanError(f"{model_arg} is already packed; pack an uncompressed checkpoint or preset")
        plan = resolve_plan(plan_arg, m.config)           # errors before any quantisation
        expected = plan_bytes(m.config, plan).total_bytes
        t_load = time.perf_counter() - t0
        reuse_freed_memory()
        compress(m, plan, seed=seed, fast_svd=not exact_svd, progress=progress)
    t_quant = time.perf_counter() - t0 - t_load
    save_packed(m, out)
    manifest = json.loads((out / MANIFEST).read_text())
    if manifest["payload_bytes"] != expected:             # specs.py and the modules disagree
        raise RuntimeError(f"payload {manifest['payload_bytes']} B != dfplan size {expected} B")
    return {"out": str(out), "model": model_arg, "plan": str(plan_arg),
            "payload_bytes": manifest["payload_bytes"], "size_bytes": expected,
            "weights_file_bytes": manifest["files"]["model.safetensors"]["bytes"],
            "load_s": t_load, "quantize_s": t_quant, "total_s": time.perf_counter() - t0,
            "lowrank_init": "exact" if exact_svd else "randomized"}
