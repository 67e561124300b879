"""Mamba-2 configuration with mamba_ssm's field names, named presets and JSON loading.

Field names follow mamba_ssm's MambaConfig (d_model, n_layer, ssm_cfg, attn_layer_idx,
attn_cfg, d_intermediate, ...) so a mamba_ssm config.json loads as-is; the Mamba2
mixer fields that mamba_ssm keeps in ssm_cfg are flattened here with its defaults.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DfplanError

# Fields of mamba_ssm's Mamba2 mixer (its ssm_cfg) that this config flattens.
_SSM_KEYS = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "conv_bias",
             "bias", "norm_before_gate", "D_has_hdim", "dt_min", "dt_max", "dt_init_floor",
             "A_init_range")


@dataclass(frozen=True)
class Mamba2Config:
    d_model: int = 2560
    n_layer: int = 64
    vocab_size: int = 50277
    d_intermediate: int = 0            # > 0 adds a gated MLP after every mixer
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    rms_norm: bool = True
    residual_in_fp32: bool = True
    norm_epsilon: float = 1e-5
    # Mamba2 mixer (mamba_ssm ssm_cfg)
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False                 # in_proj / out_proj bias
    D_has_hdim: bool = False
    norm_before_gate: bool = False
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple = (1.0, 16.0)
    # hybrid attention (mamba_ssm attn_cfg: num_heads, num_heads_kv, head_dim,
    # rotary_emb_dim, rotary_emb_base, qkv_proj_bias, out_proj_bias, mlp_dim, softmax_scale)
    attn_layer_idx: tuple = ()
    attn_cfg: dict = field(default_factory=dict)
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "attn_layer_idx", tuple(int(i) for i in self.attn_layer_idx))
        object.__setattr__(self, "A_init_range", tuple(self.A_init_range))
        problems = []
        for k in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim",
                  "ngroups", "chunk_size", "pad_vocab_size_multiple"):
            if int(getattr(self, k)) <= 0:
                problems.append(f"{k} must be positive")
        if self.d_inner % self.headdim:
            problems.append(f"d_inner={self.d_inner} is not a multiple of headdim={self.headdim}")
        if self.nheads % self.ngroups:
            problems.append(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")
        if not self.rms_norm:
            problems.append("rms_norm=False (LayerNorm blocks) is not supported")
        bad = [i for i in self.attn_layer_idx if not 0 <= i < self.n_layer]
        if bad:
            problems.append(f"attn_layer_idx {bad} outside 0..{self.n_layer - 1}")
        if self.attn_layer_idx:
            if "num_heads" not in self.attn_cfg:
                problems.append("attn_cfg needs num_heads for attention layers")
            if int(self.attn_cfg.get("d_conv", 0)) != 0:
                problems.append("attn_cfg d_conv > 0 (convolution in attention) is not supported")
        if problems:
            raise DfplanError("invalid Mamba2 config: " + "; ".join(problems))

    # derived sizes -------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        # [z, xBC, dt]
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def vocab_padded(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def mlp_hidden(self) -> int:
        # mamba_ssm GatedMLP rounds hidden features up to a multiple of 128
        return (self.d_intermediate + 127) // 128 * 128 if self.d_intermediate > 0 else 0

    # construction --------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> "Mamba2Config":
        key = name.lower().removeprefix("preset:").removeprefix("mamba2-").removeprefix("mamba2_")
        if key not in PRESETS:
            raise DfplanError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return PRESETS[key]

    def replace(self, **kw) -> "Mamba2Config":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom") -> "Mamba2Config":
        """Build from a mamba_ssm config dict (ssm_cfg nested) or our own flat dict."""
        d = dict(d)
        ssm = dict(d.pop("ssm_cfg", None) or {})
        layer = ssm.pop("layer", "Mamba2")
        if layer != "Mamba2":
            raise DfplanError(f"ssm_cfg.layer={layer!r}: only Mamba2 mixers are supported")
        if not ssm.pop("rmsnorm", True):
            raise DfplanError("ssm_cfg.rmsnorm=False (ungated output norm) is not supported")
        if ssm.pop("d_ssm", None) is not None:
            raise DfplanError("ssm_cfg.d_ssm (partial SSM width) is not supported")
        dt_limit = ssm.pop("dt_limit", None)
        if dt_limit is not None and (float(dt_limit[0]) != 0.0 or float(dt_limit[1]) != float("inf")):
            raise DfplanError(f"ssm_cfg.dt_limit={dt_limit} is not supported (only (0, inf))")
        flat = {**d, **ssm}
        for k in ("fused_add_norm", "_name_or_path", "architectures", "model_type", "name"):
            flat.pop(k, None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise DfplanError(f"config has fields dfplan does not know: {unknown}")
        try:
            return cls(**flat, name=name)
        except TypeError as e:
            raise DfplanError(f"malformed config: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "Mamba2Config":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise DfplanError(f"config file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as e:
            raise DfplanError(f"cannot read config {path}: {e}") from None
        if not isinstance(d, dict):
            raise DfplanError(f"config {path} is not a JSON object")
        return cls.from_dict(d, name=path.parent.name or "custom")

    def to_mamba_ssm_dict(self) -> dict:
        """The config.json mamba_ssm writes (ssm_cfg nested)."""
        ssm = {k: getattr(self, k) for k in _SSM_KEYS}
        ssm.update(A_init_range=list(self.A_init_range), layer="Mamba2")
        return {
            "d_model": self.d_model, "d_intermediate": self.d_intermediate, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": list(self.attn_layer_idx),
            "attn_cfg": dict(self.attn_cfg), "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings, "norm_epsilon": self.norm_epsilon,
        }


def _p(name, d_model, n_layer, **kw) -> Mamba2Config:
    return Mamba2Config(d_model=d_model, n_layer=n_layer, name=name, **kw)


# tiny/small are for the built-in teacher (trained here on CPU, own BPE vocab);
# the rest are the state-spaces/mamba2-* shapes.
PRESETS: dict[str, Mamba2Config] = {
    "tiny": _p("tiny", 128, 4, vocab_size=4096, d_state=32, headdim=32, chunk_size=64),
    "small": _p("small", 256, 6, vocab_size=8192, d_state=64, headdim=32, chunk_size=64),
    "130m": _p("mamba2-130m", 768, 24),
    "370m": _p("mamba2-370m", 1024, 48),
    "780m": _p("mamba2-780m", 1536, 48),
    "1.3b": _p("mamba2-1.3b", 2048, 48),
    "2.7b": _p("mamba2-2.7b", 2560, 64),
}
