"""Attention and MLP blocks of hybrid Mamba-2 models, built the way mamba_ssm builds them.

MHA: one in_proj producing [q, k, v (+ gated-MLP branch)], grouped KV heads, rotary
embedding on the first rotary_emb_dim dims of q and k (GPT-NeoX half rotation), softmax
attention, out_proj over [context (+ MLP branch)]. Parameter names and defaults match
mamba_ssm.modules.mha.MHA so the same state dicts and attn_cfg load the same model; in
particular causal defaults to False there and here (config loading warns about it).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotary_tables(dim: int, base: float, positions: torch.Tensor, dtype=torch.float32):
    """cos, sin of shape (L, dim/2) for integer positions (L,)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim))
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, L, h, D); rotates the first 2 * cos.shape[-1] dims as two halves (non-interleaved)."""
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)


class MHA(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_heads_kv: int | None = None,
                 head_dim: int | None = None, mlp_dim: int = 0, qkv_proj_bias: bool = True,
                 out_proj_bias: bool = True, softmax_scale: float | None = None, causal: bool = False,
                 rotary_emb_dim: int = 0, rotary_emb_base: float = 10000.0,
                 rotary_emb_interleaved: bool = False, d_conv: int = 0, layer_idx: int | None = None,
                 device=None, dtype=None):
        super().__init__()
        if rotary_emb_interleaved:
            raise ValueError("interleaved rotary embeddings are not supported")
        if d_conv:
            raise ValueError("attention with d_conv > 0 is not supported")
        fk = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv or num_heads
        if self.num_heads % self.num_heads_kv:
            raise ValueError("num_heads must be a multiple of num_heads_kv")
        self.head_dim = head_dim or d_model // num_heads
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256 if mlp_dim > 0 else 0
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.layer_idx = layer_idx
        qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(d_model, qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **fk)
        self.out_proj = nn.Linear(self.head_dim * num_heads + self.mlp_dim // 2, d_model,
                                  bias=out_proj_bias, **fk)

    def _split(self, u: torch.Tensor, positions: torch.Tensor):
        """u (b, L, d) -> q (b, L, h, D), k, v (b, L, hkv, D), mlp branch (b, L, mlp/2) or None."""
        qkv = self.in_proj(u)
        x_mlp = None
        if self.mlp_dim:
            qkv, x_mlp = qkv.split([qkv.shape[-1] - self.mlp_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        D, h, hkv = self.head_dim, self.num_heads, self.num_heads_kv
        q, k, v = qkv.split([h * D, hkv * D, hkv * D], dim=-1)
        q = q.unflatten(-1, (h, D))
        k = k.unflatten(-1, (hkv, D))
        v = v.unflatten(-1, (hkv, D))
        if self.rotary_emb_dim:
            cos, sin = rotary_tables(self.rotary_emb_dim, self.rotary_emb_base, positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v, x_mlp

    def _attend(self, q, k, v, x_mlp, causal: bool):
        """q (b, Lq, h, D), k, v (b, Lk, hkv, D) -> out (b, Lq, d_model)."""
        rep = self.num_heads // self.num_heads_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        ctx = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=self.softmax_scale)
        ctx = ctx.transpose(1, 2).flatten(-2)                        # (b, Lq, h * D)
        if x_mlp is not None:
            ctx = torch.cat([ctx, x_mlp], dim=-1)
        return self.out_proj(ctx)

    def forward(self, u: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        L = u.shape[1]
        positions = torch.arange(L, device=u.device)
        q, k, v, x_mlp = self._split(u, positions)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        return self._attend(q, k, v, x_mlp, causal=self.causal)

    def step(self, u: torch.Tensor, cache: dict, pos: int) -> torch.Tensor:
        """u (b, d) one token at position `pos`; cache holds k, v (b, pos, hkv, D)."""
        q, k, v, x_mlp = self._split(u[:, None], torch.tensor([pos], device=u.device))
        if cache.get("k") is not None:
            k = torch.cat([cache["k"], k], dim=1)
            v = torch.cat([cache["v"], v], dim=1)
        cache["k"], cache["v"] = k, v
        return self._attend(q, k, v, x_mlp, causal=False)[:, 0]


class GatedMLP(nn.Module):
    """fc1 -> (y, gate) -> y * silu(gate) -> fc2, hidden rounded up to a multiple of 128."""

    def __init__(self, d_model: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))
