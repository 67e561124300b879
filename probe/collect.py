"""Run a model over the prompts and read out, at the last prompt token of every depth,
the residual stream and the logit lens of the answer's first token.

Depth index 0 is the embedding, index i >= 1 the stream after block i-1 (so a model with
n_layer blocks has n_layer + 1 depths). The logit lens is the model's own head (final
norm + lm_head / tied embedding) applied to the intermediate stream.

Prompts are right-padded into batches: Mamba layers and causal attention never let the
state at a prompt's last real token see the padding after it. A hybrid with non-causal
attention (mamba_ssm's default) would, so its batches hold prompts of one length only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfplan.errors import DfplanError


@dataclass
class Readout:
    states: torch.Tensor    # (S, N, d) float32 last-token residual stream, S = n_layer + 1
    rank: torch.Tensor      # (S, N) int64 answer's rank in the lens (0 = the top token)
    logprob: torch.Tensor   # (S, N) float32 answer's log-probability in the lens
    top1: torch.Tensor      # (S, N) int64 the lens's top token

    @property
    def n_layer(self) -> int:
        return self.states.shape[0] - 1


def _groups(ids: list[list[int]], batch_size: int, same_length: bool):
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    if not same_length:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    by_len: dict[int, list[int]] = {}
    for i in order:
        by_len.setdefault(len(ids[i]), []).append(i)
    return [g[s:s + batch_size] for g in by_len.values() for s in range(0, len(g), batch_size)]


def _needs_same_length(model) -> bool:
    return any(blk.is_attention and not getattr(blk.mixer, "causal", True) for blk in model.backbone.layers)


def _batches(ids: list[list[int]], batch_size: int, same_length: bool = False):
    """Index batches grouped by length (less padding); yields (indices, (B, L) ids, (B,) last pos)."""
    for idx in _groups(ids, batch_size, same_length):
        L = max(len(ids[i]) for i in idx)
        x = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(ids[i])] = torch.tensor(ids[i])
        yield idx, x, torch.tensor([len(ids[i]) - 1 for i in idx])


def _lens(model, state: torch.Tensor, answers: torch.Tensor, vocab: int):
    """state (B, d) -> (rank (B,), logprob (B,), top1 (B,)) over the real vocab (padding rows
    of a padded embedding never count)."""
    logits = model.head(state, None)[..., :vocab].float()                  # (B, V)
    lp = F.log_softmax(logits, dim=-1)
    ans = lp.gather(1, answers[:, None])                                   # (B, 1)
    return (lp > ans).sum(1), ans[:, 0], lp.argmax(1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def read_model(model, ids: list[list[int]], answers: list[int], vocab: int, batch_size: int = 16,
               desc: str = "probe", progress: bool = True) -> Readout:
    dev, N = _device(model), len(ids)
    S = model.config.n_layer + 1
    states = torch.empty(S, N, model.config.d_model)
    rank = torch.empty(S, N, dtype=torch.long)
    logprob = torch.empty(S, N)
    top1 = torch.empty(S, N, dtype=torch.long)
    ans_all = torch.tensor(answers)
    batches = list(_batches(ids, batch_size, _needs_same_length(model)))
    for idx, x, last in tqdm(batches, desc=desc, leave=False, disable=not progress):
        x, last = x.to(dev), last.to(dev)
        a = ans_all[idx].to(dev)
        rows = torch.arange(len(idx), device=dev)
        for s, stream in enumerate(model.residual_stream(x)):              # (B, L, d)
            h = stream[rows, last]                                         # (B, d)
            r, lp, t = _lens(model, h, a, vocab)
            states[s, idx] = h.float().cpu()
            rank[s, idx], logprob[s, idx], top1[s, idx] = r.cpu(), lp.cpu(), t.cpu()
    return Readout(states, rank, logprob, top1)


def check_compatible(teacher, student) -> None:
    """A student's block i must drop into the teacher's place i."""
    a, b = teacher.config, student.config
    for f in ("n_layer", "d_model", "attn_layer_idx", "d_intermediate"):
        if getattr(a, f) != getattr(b, f):
            raise DfplanError(f"student and teacher differ in {f} ({getattr(b, f)} vs {getattr(a, f)}); "
                              "the probe compares a student compressed from this teacher")
    if a.vocab_size != b.vocab_size:
        raise DfplanError(f"student vocab {b.vocab_size} != teacher vocab {a.vocab_size}")


@dataclass
class SwapReadout:
    logprob: torch.Tensor   # (n_layer, N) final answer log-prob with only block i the student's
    rank: torch.Tensor      # (n_layer, N)
    kl: torch.Tensor        # (n_layer, N) KL(teacher final || swapped final) at the last token
    base_logprob: torch.Tensor   # (N,) the teacher's own final answer log-prob
    base_rank: torch.Tensor      # (N,)


@torch.no_grad()
def read_swaps(teacher, student, ids: list[list[int]], answers: list[int], vocab: int,
               batch_size: int = 16, progress: bool = True) -> SwapReadout:
    """For each block i: the teacher with its block i replaced by the student's block i
    (everything else the teacher's), read at the final layer. The teacher's streams are
    computed once per batch and reused as every suffix's input."""
    check_compatible(teacher, student)
    dev, N, L = _device(teacher), len(ids), teacher.config.n_layer
    lp_out = torch.empty(L, N)
    rank_out = torch.empty(L, N, dtype=torch.long)
    kl_out = torch.empty(L, N)
    base_lp, base_rank = torch.empty(N), torch.empty(N, dtype=torch.long)
    ans_all = torch.tensor(answers)
    sblocks = student.backbone.layers
    batches = list(_batches(ids, batch_size, _needs_same_length(teacher) or _needs_same_length(student)))
    for idx, x, last in tqdm(batches, desc="swap", leave=False, disable=not progress):
        x, last = x.to(dev), last.to(dev)
        a = ans_all[idx].to(dev)
        rows = torch.arange(len(idx), device=dev)
        streams = list(teacher.residual_stream(x))                         # S x (B, L, d)
        ref = F.log_softmax(teacher.head(streams[-1][rows, last], None)[..., :vocab].float(), -1)
        r0 = (ref > ref.gather(1, a[:, None])).sum(1)
        base_lp[idx], base_rank[idx] = ref.gather(1, a[:, None])[:, 0].cpu(), r0.cpu()
        for i in range(L):
            # the stream entering block i, passed as (hidden, residual=None), is what forward() feeds it
            h, res = sblocks[i](streams[i], None)
            h, res = teacher.run_blocks(h, res, i + 1)
            out = teacher.head(h[rows, last], res[rows, last])[..., :vocab].float()
            lp = F.log_softmax(out, -1)
            ans = lp.gather(1, a[:, None])
            lp_out[i, idx] = ans[:, 0].cpu()
            rank_out[i, idx] = (lp > ans).sum(1).cpu()
            kl_out[i, idx] = (ref.exp() * (ref - lp)).sum(1).cpu()
    return SwapReadout(lp_out, rank_out, kl_out, base_lp, base_rank)
