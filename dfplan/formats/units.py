"""The compressible weights and the fixed tensors of a Mamba-2 model, from its config alone.

Names are module FQNs of dfplan.model.Mamba2LM (= mamba_ssm state_dict keys without the
".weight" suffix), so a plan written against a config applies to any model built from it.
No tensors are touched: the planner and the size accounting call this for every trial.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..config import Mamba2Config
from ..errors import DfplanError
from .specs import IntN, Keep, Spec

LINEAR_KINDS = ("in_proj", "out_proj", "attn_in", "attn_out", "fc1", "fc2")
HEAD_KINDS = ("embedding", "lm_head")
KINDS = HEAD_KINDS[:1] + LINEAR_KINDS + HEAD_KINDS[1:]


@dataclass(frozen=True)
class Unit:
    name: str          # module FQN, e.g. "backbone.layers.3.mixer.in_proj"
    kind: str          # in_proj | out_proj | attn_in | attn_out | fc1 | fc2 | embedding | lm_head
    block: int         # layer index; -1 for the embedding, n_layer for an untied lm_head
    shape: tuple       # (out, in) weight shape; (vocab_padded, d_model) for embedding / lm_head

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def attn_dims(cfg: Mamba2Config) -> dict:
    """mamba_ssm MHA sizes: in_proj d_model -> qkv + mlp_dim, out_proj (out + mlp_dim/2) -> d_model."""
    a = cfg.attn_cfg
    heads = int(a["num_heads"])
    heads_kv = int(a.get("num_heads_kv") or heads)
    head_dim = int(a.get("head_dim") or cfg.d_model // heads)
    mlp_dim = int(a.get("mlp_dim", 0) or 0)
    mlp_dim = math.ceil(mlp_dim / 256) * 256 if mlp_dim else 0        # mamba_ssm rounds to 256
    return {"in": head_dim * (heads + 2 * heads_kv) + mlp_dim,
            "out": head_dim * heads + mlp_dim // 2,
            "in_bias": bool(a.get("qkv_proj_bias", True)),
            "out_bias": bool(a.get("out_proj_bias", True))}


def _cfg_key(cfg: Mamba2Config) -> str:
    # Mamba2Config holds a dict (attn_cfg), so it is not hashable; its repr is a faithful key
    return repr(cfg)


def _cached(fn):
    cache: dict = {}

    def wrapper(cfg: Mamba2Config):
        key = _cfg_key(cfg)
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = fn(cfg)
        return cache[key]
    return wrapper


@_cached
def _units(cfg: Mamba2Config) -> tuple[Unit, ...]:
    d = cfg.d_model
    units = [Unit("backbone.embedding", "embedding", -1, (cfg.vocab_padded, d))]
    attn = set(cfg.attn_layer_idx)
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}"
        if i in attn:
            a = attn_dims(cfg)
            units += [Unit(f"{p}.mixer.in_proj", "attn_in", i, (a["in"], d)),
                      Unit(f"{p}.mixer.out_proj", "attn_out", i, (d, a["out"]))]
        else:
            units += [Unit(f"{p}.mixer.in_proj", "in_proj", i, (cfg.d_in_proj, d)),
                      Unit(f"{p}.mixer.out_proj", "out_proj", i, (d, cfg.d_inner))]
        if cfg.d_intermediate > 0:
            h = cfg.mlp_hidden
            units += [Unit(f"{p}.mlp.fc1", "fc1", i, (2 * h, d)),
                      Unit(f"{p}.mlp.fc2", "fc2", i, (d, h))]
    if not cfg.tie_embeddings:
        units.append(Unit("lm_head", "lm_head", cfg.n_layer, (cfg.vocab_padded, d)))
    return tuple(units)


def compressible_units(cfg: Mamba2Config) -> list[Unit]:
    """Every weight a plan may compress, in model order (embedding first)."""
    return list(_units(cfg))


@_cached
def _fixed(cfg: Mamba2Config) -> tuple[tuple[str, tuple], ...]:
    d = cfg.d_model
    out: list[tuple[str, tuple]] = []
    attn = set(cfg.attn_layer_idx)
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}"
        out.append((f"{p}.norm.weight", (d,)))
        m = f"{p}.mixer"
        if i in attn:
            a = attn_dims(cfg)
            if a["in_bias"]:
                out.append((f"{m}.in_proj.bias", (a["in"],)))
            if a["out_bias"]:
                out.append((f"{m}.out_proj.bias", (d,)))
        else:
            h = cfg.nheads
            out.append((f"{m}.conv1d.weight", (cfg.conv_dim, 1, cfg.d_conv)))
            if cfg.conv_bias:
                out.append((f"{m}.conv1d.bias", (cfg.conv_dim,)))
            if cfg.bias:
                out.append((f"{m}.in_proj.bias", (cfg.d_in_proj,)))
            out += [(f"{m}.dt_bias", (h,)), (f"{m}.A_log", (h,)),
                    (f"{m}.D", (cfg.d_inner if cfg.D_has_hdim else h,)),
                    (f"{m}.norm.weight", (cfg.d_inner,))]
            if cfg.bias:
                out.append((f"{m}.out_proj.bias", (d,)))
        if cfg.d_intermediate > 0:
            out.append((f"{p}.norm2.weight", (d,)))
    out.append(("backbone.norm_f.weight", (d,)))
    return tuple(out)


def fixed_tensors(cfg: Mamba2Config) -> list[tuple[str, tuple]]:
    """(state_dict key, shape) of every tensor no plan compresses: norms, conv1d, A_log, D,
    dt_bias and linear biases. They are stored in the plan's `default` Keep dtype."""
    return list(_fixed(cfg))


def allowed_specs(unit: Unit) -> Callable[[Spec], bool]:
    """Which specs a unit may take: the embedding / lm_head only Keep or row-wise IntN
    (a gathered row must dequantise alone); linears take everything their shape allows."""
    def linear_ok(spec: Spec) -> bool:
        try:
            spec.validate(unit.shape)
        except DfplanError:
            return False
        return True

    def head_ok(spec: Spec) -> bool:
        return isinstance(spec, Keep) or (isinstance(spec, IntN) and spec.group == 0)

    return head_ok if unit.kind in HEAD_KINDS else linear_ok


def unit_index(cfg: Mamba2Config) -> dict[str, Unit]:
    return {u.name: u for u in _units(cfg)}
