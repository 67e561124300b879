"""Modules that run K alternative weights of one layer in a single batched pass.

The batch holds K stacked copies of the calibration micro-batch, (K * b, ...): copy k goes
through weight k. Every later layer is shared, so K candidates of one unit cost one pass
over the suffix of the network instead of K. Each copy is computed with exactly the op the
model itself uses (F.linear, F.embedding), so a candidate whose weight equals the original
reproduces the teacher's numbers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import SqnrSums


class MultiLinear(nn.Module):
    """K weights for one linear; optionally records the SQNR of each copy's output
    against the original weight applied to the same input."""

    def __init__(self, weights: Sequence[torch.Tensor], bias: torch.Tensor | None,
                 reference: torch.Tensor | None = None, sqnr: Sequence[SqnrSums] | None = None,
                 shared_input: bool = False):
        super().__init__()
        self.weights = list(weights)                                  # K x (out, in)
        # every copy sees the same input (nothing upstream differs): one reference output serves all
        self.shared_input = shared_input
        self.bias = bias
        self.reference = reference                                    # (out, in) original
        self.sqnr = sqnr

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (K*b, ..., in)
        xs = x.chunk(len(self.weights), dim=0)
        ys = [F.linear(xk, wk, self.bias) for xk, wk in zip(xs, self.weights)]
        if self.sqnr is not None:
            ref = F.linear(xs[0], self.reference, self.bias) if self.shared_input else None
            for k, (xk, yk) in enumerate(zip(xs, ys)):
                self.sqnr[k].add(ref if ref is not None else F.linear(xk, self.reference, self.bias), yk)
        return torch.cat(ys, dim=0) if len(ys) > 1 else ys[0]


class MultiEmbedding(nn.Module):
    """K weights for the (tied) embedding: lookup and output head both use copy k."""

    def __init__(self, weights: Sequence[torch.Tensor], reference: torch.Tensor | None = None,
                 sqnr: Sequence[SqnrSums] | None = None):
        super().__init__()
        self.weights = list(weights)                                  # K x (V, d)
        self.reference = reference
        self.sqnr = sqnr

    def forward(self, ids: torch.Tensor) -> torch.Tensor:             # (K*b, L) -> (K*b, L, d)
        idk = ids.chunk(len(self.weights), dim=0)
        ys = [F.embedding(i, w) for i, w in zip(idk, self.weights)]
        if self.sqnr is not None:
            for k, (i, yk) in enumerate(zip(idk, ys)):
                self.sqnr[k].add(F.embedding(i, self.reference), yk)
        return torch.cat(ys, dim=0) if len(ys) > 1 else ys[0]

    def attend(self, h: torch.Tensor) -> torch.Tensor:                # (K*b, L, d) -> (K*b, L, V)
        hs = h.chunk(len(self.weights), dim=0)
        ys = [F.linear(hk, w) for hk, w in zip(hs, self.weights)]
        return torch.cat(ys, dim=0) if len(ys) > 1 else ys[0]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextmanager
def swapped(model: nn.Module, replacements: dict[str, nn.Module]):
    """Temporarily replace submodules by fully qualified name; always restores them."""
    originals = {}
    try:
        for name, mod in replacements.items():
            parent, attr = _parent(model, name)
            originals[name] = getattr(parent, attr)
            setattr(parent, attr, mod)
        yield model
    finally:
        for name, mod in originals.items():
            parent, attr = _parent(model, name)
            setattr(parent, attr, mod)
