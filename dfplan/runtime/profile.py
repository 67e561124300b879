"""Where a decoded token's time goes: per-component wall time of the recurrent step.

Wraps, for the duration of the measurement only, the pieces of model.step: the embedding
gather, every mixer's in_proj / out_proj, the fused SSM step (mixer.step minus its two
linears), attention / MLP layers, the output head (final norm + lm_head), and calls the rest
(block norms, residual adds, Python) "other". Timer overhead is ~1 us per wrapped call.
The C++ layer loop (LeanStack) times the same parts itself, and its block norms + residual
adds; "other" is then the Python around it (embedding call, argmax).
Also reports the bytes a step must move: the packed weights it reads (the whole head, one
embedding row) and the SSM + conv state it reads and writes, i.e. the bandwidth bound.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from ..formats.modules import CompressedModule
from ..prompting import peak_rss_bytes
from .api import load
from .decode import prefill, state_bytes, state_dtype_of
from .leanstep import LeanStep, lean_ok


def step_bytes(model, state_dtype=torch.float32) -> dict:
    """Bytes one batch-1 decode step moves: weights read + state read and written."""
    weights = 0
    for name, mod in model.named_modules():
        if name == "backbone.embedding":
            continue                          # the head reads it whole (tied) below
        if isinstance(mod, CompressedModule):
            weights += sum(t.numel() * t.element_size() for t in mod.payload().values())
        elif isinstance(mod, torch.nn.Linear):
            weights += mod.weight.numel() * mod.weight.element_size()
    emb = model.backbone.embedding
    emb_bytes = (sum(t.numel() * t.element_size() for t in emb.payload().values())
                 if isinstance(emb, CompressedModule) else emb.weight.numel() * emb.weight.element_size())
    head = emb_bytes if model.lm_head is None else 0
    st = state_bytes(model.config, state_dtype)
    return {"weights": weights + head, **st, "total": weights + head + st["ssm_state_rw"] + st["conv_state_rw"]}


class _Timer:
    def __init__(self):
        self.t = defaultdict(float)

    def wrap(self, key, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] += time.perf_counter() - t0
        return timed


@torch.no_grad()
def profile_decode(model, prompt_len: int = 100, new_tokens: int = 128, seed: int = 0,
                   state_dtype=torch.float32, lean: bool = True) -> dict:
    """Greedy batch-1 decode of new_tokens after a random prompt, timed per component.
    lean: profile the LeanStep the decode loop uses on CPU (where it applies), else model.step."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g)
    cache = model.new_cache(1, state_dtype=state_dtype)
    logits, cache = prefill(model, ids, cache)
    nxt = logits.argmax(-1)
    for _ in range(3):                                     # warm caches / lazy unpacking
        nxt = model.step(nxt, cache).argmax(-1)
    tm = _Timer()
    patched = []                                           # (object, attribute) to restore

    def patch(obj, attr, key):
        setattr(obj, attr, tm.wrap(key, getattr(obj, attr)))
        patched.append((obj, attr))

    patch(model, "embed", "embedding")
    patch(model, "head", "head (norm_f + lm_head)")
    step, use_lean = model.step, lean and lean_ok(model)
    stack = None
    if use_lean:
        ls = LeanStep(model, cache)
        stack = ls.stack
        if stack is not None:              # the C++ layer loop times its own parts
            stack.set_timing(True)
        ls.step_kernel = tm.wrap("ssm", ls.step_kernel)
        ls.layers = [(nw, eps, tm.wrap("in_proj", fi), tm.wrap("out_proj", fo), c, sm, a)
                     for nw, eps, fi, fo, c, sm, a in ls.layers]
        step = ls
    for blk in (() if use_lean else model.backbone.layers):
        mix = blk.mixer
        if blk.is_attention:
            patch(mix, "step", "attention")
        else:
            patch(mix, "step", "mixer step")
            patch(mix.in_proj, "forward", "in_proj")
            patch(mix.out_proj, "forward", "out_proj")
        if blk.mlp is not None:
            patch(blk.mlp, "forward", "mlp")
    try:
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = step(nxt, cache).argmax(-1)
        total = time.perf_counter() - t0
    finally:
        for obj, attr in patched:
            delattr(obj, attr)                             # back to the class method
    t = dict(tm.t)
    if stack is not None:
        norms, t["in_proj"], t["ssm"], t["out_proj"] = stack.seconds()
        t["block norms + residuals"] = norms
    lin = t.get("in_proj", 0.0) + t.get("out_proj", 0.0)
    ssm = t["ssm"] if "ssm" in t else t.get("mixer step", 0.0) - lin
    parts = {"in_proj": t.get("in_proj", 0.0), "out_proj": t.get("out_proj", 0.0),
             "fused SSM step": ssm,
             "attention": t.get("attention", 0.0), "mlp": t.get("mlp", 0.0),
             "embedding": t.get("embedding", 0.0), "head (norm_f + lm_head)": t.get("head (norm_f + lm_head)", 0.0),
             "block norms + residuals": t.get("block norms + residuals", 0.0)}
    parts = {k: v for k, v in parts.items() if v > 0}
    other = "other (argmax, Python)" if stack is not None else "other (norms, residuals, argmax, Python)"
    parts[other] = max(0.0, total - sum(parts.values()))
    per_tok = total / new_tokens
    return {"tokens": new_tokens, "ms_per_token": 1000 * per_tok, "tok_s": 1 / per_tok,
            "step": ("lean (C++ layer loop)" if stack is not None else "lean") if use_lean else "model.step",
            "threads": torch.get_num_threads(),
            "breakdown_ms": {k: 1000 * v / new_tokens for k, v in parts.items()},
            "breakdown_share": {k: v / total for k, v in parts.items()},
            "bytes_per_step": step_bytes(model, state_dtype)}


def decode_benchmark(model_arg: str, threads: int = 1, prompt_len: int = 100, new_tokens: int = 128,
                     state_dtype: str | None = None, repeats: int = 3, seed: int = 0) -> dict:
    """Prefill ms and decode tok/s of Model.generate (best of `repeats`), then a profile.
    state_dtype None: the artifact plan's state precision, else fp32."""
    torch.set_num_threads(threads)
    m = load(model_arg, state_dtype=state_dtype)
    state_dtype = m.state_dtype_name
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (1, prompt_len), generator=g)
    m.generate(ids, 4, eos=False)                                   # warm-up (lazy unpacking)
    runs = []
    for _ in range(repeats):
        m.generate(ids, new_tokens, eos=False)
        runs.append(m.last_stats.to_json())
    best = {"prefill_ms": min(r["prefill_ms"] for r in runs),
            "decode_tok_s": max(r["decode_tok_s"] for r in runs)}
    prof = profile_decode(m.module, prompt_len, min(new_tokens, 32), seed, state_dtype_of(state_dtype))
    return {"model": model_arg, "threads": threads, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "state_dtype": state_dtype, "state_dtype_from": m.state_dtype_origin, **best, "runs": runs, "peak_rss_bytes": peak_rss_bytes(),
            "payload_bytes": getattr(m.module, "dfplan_manifest", {}).get("payload_bytes"),
            "profile": prof}


if __name__ == "__main__":
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description="Decode benchmark + per-component profile of one model.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--state-dtype", default=None, choices=["fp32", "bf16", "fp16"],
                    help="SSM state precision (default: the artifact plan's, else fp32)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    res = decode_benchmark(a.model, a.threads, a.prompt_len, a.new_tokens, a.state_dtype, a.repeats)
    print(f"SSM state {res['state_dtype']} ({res['state_dtype_from']}), "
          f"{res['profile']['bytes_per_step']['ssm_state_rw']:,} state bytes/token", file=sys.stderr)
    print(json.dumps(res, indent=1))
