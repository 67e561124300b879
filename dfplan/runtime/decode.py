"""The decode loop: chunked prefill that carries the state, then one recurrent step per token.

Prefill runs the chunked SSD scan over at most `prefill_chunk` tokens at a time, continuing
the conv window and SSM state from chunk to chunk (Mamba2Mixer.forward resumes a cache), so
a long prompt needs memory for one chunk, not for the whole prompt; only the last position's
logits are computed.

Prompts of different lengths are never padded: padding an SSM on the left would push pad
tokens through the state. Each prompt is prefilled on its own into its row of one batched
cache (a row slice of a contiguous state is contiguous, so the in-place updates land in the
batch tensors), then all rows decode together. A row's arithmetic in the batched step is the
same as alone (every kernel works per token), which the tests check against one-at-a-time.
Hybrid models with attention layers decode each prompt separately (their k/v caches grow
per row).

The state, the conv windows and the output token buffer are allocated once per call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import DfplanError
from ..model import InferenceCache
from ..prompting import DecodeStats
from .sampling import Sampling, sample

STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def state_dtype_of(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in STATE_DTYPES:
        raise DfplanError(f"state dtype {name!r} is not one of {', '.join(STATE_DTYPES)}")
    return STATE_DTYPES[name]


def state_bytes(cfg, state_dtype=torch.float32) -> dict:
    """Bytes of recurrent state one batch-1 decode step reads and writes: the SSM state in
    `state_dtype` (read and written every token) and the conv windows (always fp32)."""
    n_mamba = cfg.n_layer - len(cfg.attn_layer_idx)
    ssm = n_mamba * cfg.nheads * cfg.headdim * cfg.d_state * torch.finfo(state_dtype_of(state_dtype)).bits // 8
    conv = n_mamba * cfg.conv_dim * cfg.d_conv * 4
    return {"ssm_state_rw": 2 * ssm, "conv_state_rw": 2 * conv}


@dataclass
class DecodeResult:
    tokens: list = field(default_factory=list)     # per row: generated ids (stops removed)
    finished: list = field(default_factory=list)   # per row: "stop" | "length"
    stats: DecodeStats = field(default_factory=DecodeStats)


def has_attention(model) -> bool:
    return bool(model.config.attn_layer_idx)


def _row_cache(cache: InferenceCache, i: int) -> InferenceCache:
    """Row i of a batched Mamba cache as views (writes land in the batch tensors)."""
    return InferenceCache(0, [{k: v[i:i + 1] for k, v in lc.items()} for lc in cache.layers])


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache: InferenceCache | None, chunk: int = 2048):
    """ids (1, L) -> (last-position logits (1, V), cache). `cache` is continued in place
    (pure Mamba models); None builds a fresh one in one pass (needed by attention layers)."""
    L = ids.shape[1]
    if cache is None:
        layers = [dict() for _ in range(model.config.n_layer)]
        hidden, residual = model.run_blocks(model.embed(ids), None, caches=layers)
        cache = InferenceCache(L, layers)
        return model.head(hidden[:, -1:], residual[:, -1:])[:, 0], cache
    for s in range(0, L, chunk):
        part = ids[:, s:s + chunk]
        hidden, residual = model.run_blocks(model.embed(part), None, caches=cache.layers)
    cache.seqlen += L
    return model.head(hidden[:, -1:], residual[:, -1:])[:, 0], cache


StepFn = Callable[[torch.Tensor, InferenceCache], torch.Tensor]


@torch.no_grad()
def decode(model, prompts: list[torch.Tensor], max_new_tokens: int, sampling: Sampling = Sampling(),
           seed: int | None = None, eos_id: int | None = None,
           on_tokens: Callable[[torch.Tensor, int], bool] | None = None,
           state_dtype: torch.dtype = torch.float32, prefill_chunk: int = 2048,
           step_fn: Callable | None = None) -> DecodeResult:
    """Generate up to max_new_tokens after each prompt (1-D int64 tensors, any lengths).

    on_tokens(tokens (B,), t) is called after each new token column; returning True stops
    the whole batch (stop strings are checked there, on text, by the caller). eos_id ends a
    row. step_fn(model, cache, B) may return a replacement step (the CUDA graph); default
    model.step. Returns per-row generated ids without the eos / beyond the stop point.
    """
    if has_attention(model) and len(prompts) > 1:
        results = [decode(model, [p], max_new_tokens, sampling, seed, eos_id, on_tokens, state_dtype,
                          prefill_chunk, step_fn) for p in prompts]
        out = DecodeResult(stats=DecodeStats())
        for r in results:
            out.tokens += r.tokens
            out.finished += r.finished
            for k in ("prompt_tokens", "new_tokens", "steps", "prefill_s", "decode_s"):
                setattr(out.stats, k, getattr(out.stats, k) + getattr(r.stats, k))
        return out
    B = len(prompts)
    dev = model.backbone.norm_f.weight.device
    V = model.config.vocab_size
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev).manual_seed(int(seed))
    stats = DecodeStats(prompt_tokens=sum(int(p.numel()) for p in prompts), batch=B)

    t0 = time.perf_counter()
    if has_attention(model):
        logits, cache = prefill(model, prompts[0].to(dev).view(1, -1), None)
    else:
        cache = model.new_cache(B, device=dev, state_dtype=state_dtype)
        rows = []
        for i, p in enumerate(prompts):
            lg, _ = prefill(model, p.to(dev).view(1, -1), _row_cache(cache, i), prefill_chunk)
            rows.append(lg)
        logits = torch.cat(rows)                                       # (B, V)
    _sync(dev)
    stats.prefill_s = time.perf_counter() - t0

    step = step_fn(model, cache, B) if step_fn is not None else model.step
    tokens = torch.empty(B, max_new_tokens, dtype=torch.int64, device=dev)   # allocated once
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.int64, device=dev)
    t0 = time.perf_counter()
    nxt = sample(logits[:, :V], sampling, gen)
    n = 0
    for t in range(max_new_tokens):
        tokens[:, t] = nxt
        n = t + 1
        if eos_id is not None:
            hit = alive & (nxt == eos_id)
            lengths = torch.where(hit, t, lengths)
            alive = alive & ~hit
            if not bool(alive.any()):
                break
        if on_tokens is not None and on_tokens(nxt, t):
            break
        if t + 1 == max_new_tokens:
            break
        nxt = sample(step(nxt, cache)[:, :V], sampling, gen)
        stats.steps += 1
    _sync(dev)
    stats.decode_s = time.perf_counter() - t0
    lengths = lengths.clamp(max=n).tolist()
    toks = tokens[:, :n].tolist()
    res = DecodeResult(stats=stats)
    for i in range(B):
        res.tokens.append(toks[i][:lengths[i]])
        res.finished.append("stop" if lengths[i] < n or n < max_new_tokens else "length")
    stats.new_tokens = sum(len(t) for t in res.tokens)
    return res


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
