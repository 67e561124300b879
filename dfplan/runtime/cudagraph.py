"""The whole decode step captured in one CUDA graph, replayed per token (mamba_ssm's cg=True).

Static buffers: the token ids fed in, the logits coming out, and the decode cache itself
(its conv windows and SSM states are updated in place by the captured kernels, so the graph
always reads and writes the same memory). Warm-up runs before capture would advance the
state, so the state is snapshotted first and restored after. Pure Mamba models only: the
attention k/v caches grow every token and cannot be static.
"""
from __future__ import annotations

import torch

from ..model import InferenceCache


class GraphStep:
    """Callable like model.step(ids, cache) -> logits, for the one cache it was built on."""

    def __init__(self, model, cache: InferenceCache, batch: int, warmup: int = 2):
        if model.config.attn_layer_idx:
            raise ValueError("CUDA graph decode needs a pure Mamba model (no attention layers)")
        dev = model.backbone.norm_f.weight.device
        if dev.type != "cuda":
            raise ValueError("CUDA graph decode needs the model on a CUDA device")
        self.model, self.cache = model, cache
        self.ids = torch.zeros(batch, dtype=torch.int64, device=dev)
        saved = [{k: v.clone() for k, v in lc.items()} for lc in cache.layers]
        seqlen = cache.seqlen
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):                     # allocations and autotuning happen here
                model.step(self.ids, cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = model.step(self.ids, cache)
        for lc, s in zip(cache.layers, saved):
            for k, v in s.items():
                lc[k].copy_(v)
        cache.seqlen = seqlen

    def __call__(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        if cache is not self.cache:
            raise ValueError("this CUDA graph was captured on another cache")
        self.ids.copy_(ids)
        self.graph.replay()
        cache.seqlen += 1
        return self.logits


def graph_step_factory(model, cache: InferenceCache, batch: int):
    """decode(step_fn=...) hook: a GraphStep for CUDA pure-Mamba models, else model.step."""
    dev = model.backbone.norm_f.weight.device
    if dev.type != "cuda" or model.config.attn_layer_idx:
        return model.step
    return GraphStep(model, cache, batch)
