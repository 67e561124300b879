"""The teacher's pass over the calibration windows, cached once.

For every micro-batch we keep the residual stream at the input of every block and the
teacher's logits. A block's first act is `residual = hidden + residual` (Block._add), so
the stream after that addition is all a block needs: running block i on (stream_i, None)
gives bit-for-bit the teacher's block-i computation. A candidate that changes a unit of
block i then only runs blocks i..L-1 and the head.

Memory: (n_layer + 1) * N * L * d_model * 4 bytes of streams plus N * L * vocab * 4 bytes
of logits (N windows of L tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dfplan.errors import DfplanError


@dataclass
class CalibBatch:
    inputs: torch.Tensor            # (b, L) int64 token ids
    targets: torch.Tensor           # (b, L) int64 next tokens
    streams: list                   # n_layer + 1 tensors (b, L, d): stream at block i's input; [n_layer] = head input
    logits: torch.Tensor            # (b, L, V) float32, real vocabulary only


def stream_into(model, i: int, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The residual stream block i (or the head, i == n_layer) forms from (hidden, residual),
    with the block's own dtype rules."""
    layers = model.backbone.layers
    if i < len(layers):
        return layers[i]._add(hidden, residual)
    return hidden if residual is None else hidden.to(residual.dtype) + residual


def calibration_tensor(windows, device=None) -> torch.Tensor:
    w = torch.as_tensor(np.asarray(windows), dtype=torch.long, device=device)
    if w.dim() != 2 or w.shape[0] < 1 or w.shape[1] < 2:
        raise DfplanError(f"calibration windows must be (N >= 1, L + 1 >= 2) token ids, got shape {tuple(w.shape)}")
    return w


class TeacherCache:
    """Block-input streams and logits of the unmodified model on the calibration windows."""

    def __init__(self, model, windows, batch_windows: int = 8):
        cfg = model.config
        device = model.backbone.norm_f.weight.device
        w = calibration_tensor(windows, device)
        if int(w.max()) >= cfg.vocab_padded or int(w.min()) < 0:
            raise DfplanError(f"calibration token ids span {int(w.min())}..{int(w.max())} but the model's "
                              f"vocabulary has {cfg.vocab_size} entries; use the model's own tokenizer")
        self.n_layer = cfg.n_layer
        self.vocab_size = cfg.vocab_size
        self.n_windows, self.seq_len = w.shape[0], w.shape[1] - 1
        self.batch_windows = batch_windows
        self.batches: list[CalibBatch] = []
        with torch.no_grad():
            for s in range(0, w.shape[0], batch_windows):
                chunk = w[s:s + batch_windows]
                self.batches.append(self._run(model, chunk[:, :-1], chunk[:, 1:]))
        self.block_forwards = self.n_layer

    def _run(self, model, inputs, targets) -> CalibBatch:
        hidden, residual = model.embed(inputs), None
        streams = []
        for i in range(self.n_layer):
            streams.append(stream_into(model, i, hidden, residual))
            hidden, residual = model.run_blocks(streams[-1], None, i, i + 1)
        streams.append(stream_into(model, self.n_layer, hidden, residual))
        logits = model.head(streams[-1], None)[..., :self.vocab_size].float().contiguous()
        return CalibBatch(inputs, targets, streams, logits)

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.seq_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.batches for t in (*b.streams, b.logits))
