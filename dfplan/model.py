"""Mamba-2 language model (and mamba_ssm-style hybrids) in pure PyTorch.

Module names mirror mamba_ssm's MambaLMHeadModel, so its checkpoints load key for key:
backbone.embedding, backbone.layers.{i}.{norm, mixer, norm2, mlp}, backbone.norm_f, lm_head.
Every linear is called as a module (`self.in_proj(x)`), so a compressed format is a module
swap; the tied embedding exposes forward(ids) and attend(h) so a quantized embedding can
serve as the output head too.

Two execution paths that must agree (tests check it):
  forward(ids)        chunked SSD scan over the whole sequence (prefill / training),
  step(ids_t, cache)  one token with conv + SSM state (decode).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MHA, GatedMLP
from .config import Mamba2Config
from .kernels import mamba2_step
from .ssd import ssd_chunked


class Embedding(nn.Module):
    """Token embedding that can also act as the tied output head."""

    def __init__(self, num_embeddings: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:       # (B, L) -> (B, L, d)
        return F.embedding(ids, self.weight)

    def attend(self, h: torch.Tensor) -> torch.Tensor:          # (..., d) -> (..., V)
        return F.linear(h, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) with statistics per group of `group_size` channels (mamba_ssm's
    RMSNormGated, norm_before_gate=False): one group per SSM group."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, z = x.float(), z.float()
        if not self.norm_before_gate:
            x = x * F.silu(z)
        g = x.unflatten(-1, (-1, self.group_size))                  # (..., G, dim/G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        y = g.flatten(-2) * self.weight.float()
        if self.norm_before_gate:
            y = y * F.silu(z)
        return y.to(dtype)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.cfg, self.layer_idx = cfg, layer_idx
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias, **fk)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, kernel_size=cfg.d_conv, groups=cfg.conv_dim,
                                padding=cfg.d_conv - 1, bias=cfg.conv_bias, **fk)
        self.dt_bias = nn.Parameter(torch.empty(cfg.nheads, **fk))
        self.A_log = nn.Parameter(torch.empty(cfg.nheads, **fk))
        self.D = nn.Parameter(torch.empty(cfg.d_inner if cfg.D_has_hdim else cfg.nheads, **fk))
        # norm_epsilon, as transformers' layer_norm_epsilon (mamba_ssm: always 1e-5, = its default)
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.ngroups, eps=cfg.norm_epsilon,
                                 norm_before_gate=cfg.norm_before_gate, **fk)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias, **fk)

    def _split_proj(self, zxbcdt):
        c = self.cfg
        return zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)   # z, xBC, dt

    def _ssm_inputs(self, xBC):
        c = self.cfg
        x, B, C = xBC.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        return (x.unflatten(-1, (c.nheads, c.headdim)), B.unflatten(-1, (c.ngroups, c.d_state)),
                C.unflatten(-1, (c.ngroups, c.d_state)))

    def _skip(self, x):                                            # D x, per head or per channel
        D = self.D.float()
        return x.float() * (D.view(self.cfg.nheads, self.cfg.headdim) if self.cfg.D_has_hdim else D[:, None])

    def forward(self, u: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """u (b, L, d_model) -> (b, L, d_model); fills cache["conv"], cache["ssm"] if given.

        A cache that already holds "conv" and "ssm" (from new_cache() or an earlier call) is
        continued: u follows the tokens it has seen, and the state tensors are updated in place.
        That is how long prompts are prefilled chunk by chunk in bounded memory."""
        c = self.cfg
        b, L, _ = u.shape
        z, xBC, dt = self._split_proj(self.in_proj(u))
        resume = cache is not None and "ssm" in cache              # continue a chunked prefill
        if resume:
            # the window holds the last d_conv conv inputs; its last d_conv - 1 precede u[:, 0]
            xt = torch.cat([cache["conv"][..., 1:].to(xBC.dtype), xBC.transpose(1, 2)], dim=-1)
            cache["conv"].copy_(xt[..., -c.d_conv:])               # (b, conv_dim, d_conv), in place
            xBC = F.conv1d(xt, self.conv1d.weight, self.conv1d.bias, groups=c.conv_dim)
            xBC = F.silu(xBC.transpose(1, 2))                      # (b, L, conv_dim)
        else:
            if cache is not None:                                  # last d_conv inputs of the conv
                xt = xBC.transpose(1, 2)                           # (b, conv_dim, L)
                conv = F.pad(xt, (c.d_conv - L, 0)) if L < c.d_conv else xt[..., -c.d_conv:]
                cache["conv"] = conv.contiguous().clone()          # updated in place by step()
            xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :L].transpose(1, 2))
        x, B, C = self._ssm_inputs(xBC)                            # (b,L,H,P), (b,L,G,N), (b,L,G,N)
        dt = F.softplus(dt.float() + self.dt_bias.float())         # (b, L, H)
        A = -torch.exp(self.A_log.float())                         # (H,)
        y, final = ssd_chunked(x, dt, A, B, C, c.chunk_size,
                               initial_state=cache["ssm"] if resume else None)
        if resume:
            cache["ssm"].copy_(final)                              # keeps the state's dtype
        elif cache is not None:
            cache["ssm"] = final.float().contiguous()
        y = (y.float() + self._skip(x)).flatten(-2).to(u.dtype)    # (b, L, d_inner)
        return self.out_proj(self.norm(y, z))

    def step(self, u: torch.Tensor, cache: dict) -> torch.Tensor:
        """u (b, d_model) one token -> (b, d_model); updates cache["conv"], cache["ssm"] in place.

        Runs the fused kernel chosen by dfplan.kernels (C++ on CPU, Triton on CUDA); its
        plain-torch twin is dfplan.kernels.step_ref.mamba2_step_ref."""
        c = self.cfg
        y = mamba2_step(self.in_proj(u), cache["conv"], cache["ssm"], self.conv1d.weight,
                        self.conv1d.bias, self.dt_bias, self.A_log, self.D, self.norm.weight,
                        self.norm.eps, c.ngroups, c.headdim, c.d_state,
                        norm_before_gate=c.norm_before_gate)
        return self.out_proj(y.to(u.dtype))


class Block(nn.Module):
    """Pre-norm residual block: mixer, then (optionally) a gated MLP; residual kept in fp32."""

    def __init__(self, cfg: Mamba2Config, layer_idx: int, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.is_attention = layer_idx in cfg.attn_layer_idx
        self.norm = RMSNorm(cfg.d_model, cfg.norm_epsilon, **fk)
        if self.is_attention:
            self.mixer = MHA(cfg.d_model, layer_idx=layer_idx, **cfg.attn_cfg, **fk)
        else:
            self.mixer = Mamba2Mixer(cfg, layer_idx, **fk)
        if cfg.d_intermediate > 0:
            self.norm2 = RMSNorm(cfg.d_model, cfg.norm_epsilon, **fk)
            self.mlp = GatedMLP(cfg.d_model, cfg.mlp_hidden, **fk)
        else:
            self.norm2 = self.mlp = None

    def _add(self, hidden, residual):
        residual = hidden if residual is None else hidden.to(residual.dtype) + residual
        return residual.float() if self.residual_in_fp32 else residual

    def forward(self, hidden, residual, cache: dict | None = None, pos: int | None = None):
        """hidden (b, L, d) [or (b, d) with pos given: one decode step]; returns (hidden, residual)."""
        residual = self._add(hidden, residual)
        h = self.norm(residual.to(self.norm.weight.dtype))
        if pos is None:
            h = self.mixer(h, cache)
        elif self.is_attention:
            h = self.mixer.step(h, cache, pos)
        else:
            h = self.mixer.step(h, cache)
        if self.mlp is not None:
            residual = self._add(h, residual)
            h = self.mlp(self.norm2(residual.to(self.norm2.weight.dtype)))
        return h, residual


@dataclass
class InferenceCache:
    """Decode state: per layer {"conv", "ssm"} (Mamba) or {"k", "v"} (attention)."""
    seqlen: int = 0
    layers: list = field(default_factory=list)


class Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config, device=None, dtype=None):
        super().__init__()
        self.embedding = Embedding(cfg.vocab_padded, cfg.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(cfg, i, device=device, dtype=dtype) for i in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_epsilon, device=device, dtype=dtype)


class Mamba2LM(nn.Module):
    def __init__(self, cfg: Mamba2Config, device=None, dtype=None, init: bool = True):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, device=device, dtype=dtype)
        self.lm_head = (None if cfg.tie_embeddings else
                        nn.Linear(cfg.d_model, cfg.vocab_padded, bias=False, device=device, dtype=dtype))
        if init and str(device) != "meta":
            init_weights(self)

    # pieces, so sensitivity analysis can cache block inputs and rerun a suffix ------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.embedding(ids)

    def run_blocks(self, hidden, residual, start: int = 0, stop: int | None = None, caches=None):
        stop = self.config.n_layer if stop is None else stop
        for i in range(start, stop):
            hidden, residual = self.backbone.layers[i](hidden, residual,
                                                       None if caches is None else caches[i])
        return hidden, residual

    def head(self, hidden, residual) -> torch.Tensor:
        residual = hidden.to(residual.dtype) + residual if residual is not None else hidden
        h = self.backbone.norm_f(residual.to(self.backbone.norm_f.weight.dtype))
        return self.backbone.embedding.attend(h) if self.lm_head is None else self.lm_head(h)

    def residual_stream(self, ids: torch.Tensor):
        """Yield the residual stream (b, L, d) after the embedding, then after each block.

        These are the calls forward() makes, so numerics are unchanged; head(state, None) on
        a yielded state is the logit lens at that depth, and on the last one it is forward()."""
        hidden, residual = self.embed(ids), None
        yield hidden
        for i in range(self.config.n_layer):
            hidden, residual = self.run_blocks(hidden, residual, i, i + 1)
            yield hidden.to(residual.dtype) + residual

    # full passes ----------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, return_cache: bool = False):
        """ids (b, L) -> logits (b, L, vocab_padded) [, InferenceCache ready for step()]."""
        caches = [dict() for _ in range(self.config.n_layer)] if return_cache else None
        hidden, residual = self.run_blocks(self.embed(ids), None, caches=caches)
        logits = self.head(hidden, residual)
        if return_cache:
            return logits, InferenceCache(seqlen=ids.shape[1], layers=caches)
        return logits

    def new_cache(self, batch_size: int, dtype=None, device=None,
                  state_dtype: torch.dtype = torch.float32) -> InferenceCache:
        """Zero decode state; state_dtype is the SSM state's precision (fp32 default)."""
        c = self.config
        p = self.backbone.norm_f.weight
        dtype, device = dtype or p.dtype, device or p.device
        layers = []
        for blk in self.backbone.layers:
            if blk.is_attention:
                layers.append({"k": None, "v": None})
            else:
                layers.append({"conv": torch.zeros(batch_size, c.conv_dim, c.d_conv, dtype=dtype, device=device),
                               "ssm": torch.zeros(batch_size, c.nheads, c.headdim, c.d_state,
                                                  dtype=state_dtype, device=device)})
        return InferenceCache(0, layers)

    @torch.no_grad()
    def step(self, ids: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """ids (b,) -> logits (b, vocab_padded) for the next position; advances the cache."""
        hidden, residual = self.embed(ids.reshape(-1)), None          # (b, d)
        for blk, lc in zip(self.backbone.layers, cache.layers):
            hidden, residual = blk(hidden, residual, lc, pos=cache.seqlen)
        cache.seqlen += 1
        return self.head(hidden, residual)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a cached state: prefill once, then one step per token."""
        logits, cache = self(ids, return_cache=True)
        out = [ids]
        nxt = logits[:, -1].argmax(-1)
        for _ in range(max_new_tokens):
            out.append(nxt[:, None])
            nxt = self.step(nxt, cache).argmax(-1)
        return torch.cat(out, dim=1)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def init_weights(model: Mamba2LM, seed: int | None = None, skip=()) -> None:
    """mamba_ssm's initialisation: random, never zero, so size/latency runs are realistic.

    skip: module names whose weight is left as it is (packing fills those one at a time)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed) if seed is not None else None

    def uniform_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float32) * (hi - lo) + lo)

    def kaiming_(w):  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a=sqrt(5)
        bound = 1.0 / math.sqrt(w.shape[1] if w.dim() == 2 else w[0].numel())
        uniform_(w, -bound, bound)

    n_res = 1 if cfg.d_intermediate == 0 else 2
    emb = model.backbone.embedding.weight
    if "backbone.embedding" not in skip:
        emb.copy_(torch.randn(emb.shape, generator=gen) * 0.02)
    if model.lm_head is not None and "lm_head" not in skip:
        kaiming_(model.lm_head.weight)
    for name, mod in model.named_modules():
        if name in skip:
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif isinstance(mod, nn.Linear):
            kaiming_(mod.weight)
            if mod.bias is not None:
                mod.bias.zero_()
            if name.endswith("out_proj") or name.endswith("fc2"):
                mod.weight.div_(math.sqrt(n_res * cfg.n_layer))
        elif isinstance(mod, nn.Conv1d):
            kaiming_(mod.weight)
            if mod.bias is not None:
                b = 1.0 / math.sqrt(mod.weight[0].numel())
                uniform_(mod.bias, -b, b)
        elif isinstance(mod, Mamba2Mixer):
            lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
            dt = torch.exp(torch.rand(cfg.nheads, generator=gen) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
            mod.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse softplus
            a_lo, a_hi = cfg.A_init_range
            mod.A_log.copy_(torch.log(torch.rand(cfg.nheads, generator=gen) * (a_hi - a_lo) + a_lo))
            mod.D.fill_(1.0)
        elif isinstance(mod, (RMSNorm, GatedRMSNorm)):
            mod.weight.fill_(1.0)


def build_model(cfg: Mamba2Config, device=None, dtype=None, seed: int | None = None) -> Mamba2LM:
    """Construct a model; on device="meta" nothing is allocated (load with assign=True after)."""
    model = Mamba2LM(cfg, device=device, dtype=dtype, init=False)
    if str(device) != "meta":
        init_weights(model, seed)
    return model
