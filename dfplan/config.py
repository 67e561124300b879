"""Mamba-2 configuration with mamba_ssm's field names, named presets and JSON loading.

Field names follow mamba_ssm's MambaConfig (d_model, n_layer, ssm_cfg, attn_layer_idx,
attn_cfg, d_intermediate, ...) so a mamba_ssm config.json loads as-is; the Mamba2
mixer fields that mamba_ssm keeps in ssm_cfg are flattened here with its defaults.
Every value is parsed by the type of its field: a value that does not parse is one
DfplanError naming the key and the file; a key nobody here understands is one warning.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DfplanError, warn

# Fields of mamba_ssm's Mamba2 mixer (its ssm_cfg) that this config flattens.
_SSM_KEYS = ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size", "conv_bias",
             "bias", "norm_before_gate", "D_has_hdim", "dt_min", "dt_max", "dt_init_floor",
             "A_init_range")
# Mamba2 keyword arguments that do not change a loaded model's outputs (init / kernel choice).
_SSM_IGNORED = ("conv_init", "use_mem_eff_path")
# mamba_ssm 2.x MambaConfig (mamba_ssm/models/config_mamba.py): the only keys its
# MambaLMHeadModel.from_pretrained accepts, since it calls MambaConfig(**config_json).
MAMBA_SSM_FIELDS = ("d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                    "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm",
                    "pad_vocab_size_multiple", "tie_embeddings")
# Ours, not expressible in MambaConfig: mamba_ssm always runs with eps 1e-5 (MixerModel's
# norm_epsilon default for the block norms; Mamba2 hard-codes 1e-5 in its gated norm), while
# transformers' layer_norm_epsilon sets both. Kept beside config.json (loading.EXTRA_FILE).
EXTRA_FIELDS = ("norm_epsilon",)
# Top-level keys with no effect on the model: mamba_ssm's fused_add_norm only picks a kernel.
_TOP_IGNORED = ("fused_add_norm", "_name_or_path", "architectures", "model_type", "name")


# value parsers: (value, key, where) -> parsed value, or DfplanError naming key and file ---------
def _bad(key: str, v, where: str, expected: str) -> DfplanError:
    return DfplanError(f"cannot parse {key}={json.dumps(v, default=str)} in {where}: expected {expected}")


def parse_float(v, key: str, where: str) -> float:
    """A JSON number, a string such as "inf" / "Infinity", or transformers 5's
    {"__float__": "Infinity"} (how it writes non-finite floats)."""
    raw = v
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)                  # accepts "inf", "Infinity", "-Infinity", "1e-5"
        except ValueError:
            pass
    raise _bad(key, raw, where, "a number")


def parse_int(v, key: str, where: str) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise _bad(key, v, where, "an integer")


def parse_bool(v, key: str, where: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise _bad(key, v, where, "true or false")


def parse_range(v, key: str, where: str) -> tuple[float, float]:
    """A [low, high] pair of numbers (A_init_range, dt_limit, time_step_limit)."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return parse_float(v[0], f"{key}[0]", where), parse_float(v[1], f"{key}[1]", where)
    raise _bad(key, v, where, "a [low, high] pair")


def check_no_dt_limit(v, key: str, where: str) -> None:
    """dt clamping (mamba_ssm dt_limit, transformers time_step_limit) is only supported off."""
    lo, hi = parse_range(v, key, where)
    if lo != 0.0 or hi != math.inf:
        raise DfplanError(f"{key}={[lo, hi]} in {where} is not supported (only [0, inf]: no dt clamping)")


def _parse_int_list(v, key, where):
    if isinstance(v, (list, tuple)):
        return tuple(parse_int(x, f"{key}[{i}]", where) for i, x in enumerate(v))
    raise _bad(key, v, where, "a list of integers")


def _parse_dict(v, key, where):
    if isinstance(v, dict):
        return dict(v)
    raise _bad(key, v, where, "a JSON object")


def _parse_str(v, key, where):
    if isinstance(v, str):
        return v
    raise _bad(key, v, where, "a string")


def _optional(parse):
    return lambda v, key, where: None if v is None else parse(v, key, where)


_BY_TYPE = {"int": parse_int, "float": parse_float, "bool": parse_bool, "dict": _parse_dict, "str": _parse_str}
_BY_FIELD = {"attn_layer_idx": _parse_int_list, "A_init_range": parse_range}
# mamba_ssm MHA keyword arguments (attn_cfg) and their types
_ATTN_PARSERS = {
    "num_heads": parse_int, "num_heads_kv": _optional(parse_int), "head_dim": _optional(parse_int),
    "mlp_dim": parse_int, "qkv_proj_bias": parse_bool, "out_proj_bias": parse_bool,
    "softmax_scale": _optional(parse_float), "causal": parse_bool, "rotary_emb_dim": parse_int,
    "rotary_emb_base": parse_float, "rotary_emb_interleaved": parse_bool, "d_conv": parse_int,
}


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
    # hybrid attention (mamba_ssm attn_cfg: num_heads, num_heads_kv, head_dim, causal (default
    # False, as mamba_ssm's MHA), rotary_emb_dim, rotary_emb_base, qkv_proj_bias, out_proj_bias,
    # mlp_dim, softmax_scale)
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
    def parse_field(cls, name: str, value, key: str, where: str):
        """`value` parsed by the type of field `name`; errors name `key` (the file's own key)."""
        if name in _BY_FIELD:
            return _BY_FIELD[name](value, key, where)
        return _BY_TYPE[_FIELD_TYPES[name]](value, key, where)

    @classmethod
    def from_fields(cls, kw: dict, name: str = "custom", where: str = "config") -> "Mamba2Config":
        """Build from flat field values, each parsed by its field's type."""
        parsed = {k: cls.parse_field(k, v, k, where) for k, v in kw.items()}
        try:
            return cls(**parsed, name=name)
        except DfplanError as e:
            raise DfplanError(f"{where}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom", where: str = "config") -> "Mamba2Config":
        """Build from a mamba_ssm config dict (ssm_cfg nested) or our own flat dict.

        Keys nobody here understands are listed in one warning and ignored; a value that does
        not parse, or a feature the model does not implement, is a DfplanError."""
        d = dict(d)
        ssm = _parse_dict(d.pop("ssm_cfg", None) or {}, "ssm_cfg", where)
        layer = ssm.pop("layer", "Mamba2")
        if layer != "Mamba2":
            raise DfplanError(f"ssm_cfg.layer={layer!r} in {where}: only Mamba2 mixers are supported")
        if not parse_bool(ssm.pop("rmsnorm", True), "ssm_cfg.rmsnorm", where):
            raise DfplanError(f"ssm_cfg.rmsnorm=false in {where} (ungated output norm) is not supported")
        if ssm.pop("d_ssm", None) is not None:
            raise DfplanError(f"ssm_cfg.d_ssm in {where} (partial SSM width) is not supported")
        if "dt_limit" in ssm:
            check_no_dt_limit(ssm.pop("dt_limit"), "ssm_cfg.dt_limit", where)
        for k in _SSM_IGNORED:
            ssm.pop(k, None)
        for k in _TOP_IGNORED:
            d.pop(k, None)
        known = {f.name for f in dataclasses.fields(cls)} - {"name"}
        unknown = [f"ssm_cfg.{k}" for k in ssm if k not in _SSM_KEYS] + [k for k in d if k not in known]
        flat = {k: v for k, v in d.items() if k in known}
        flat.update((k, cls.parse_field(k, v, f"ssm_cfg.{k}", where))
                    for k, v in ssm.items() if k in _SSM_KEYS)
        if "attn_cfg" in flat:
            attn = _parse_dict(flat["attn_cfg"], "attn_cfg", where)
            unknown += [f"attn_cfg.{k}" for k in attn if k not in _ATTN_PARSERS]
            flat["attn_cfg"] = {k: _ATTN_PARSERS[k](v, f"attn_cfg.{k}", where)
                                for k, v in attn.items() if k in _ATTN_PARSERS}
        if unknown:
            warn(f"{where}: ignoring keys dfplan does not understand: {', '.join(sorted(unknown))}")
        cfg = cls.from_fields(flat, name, where)
        if cfg.attn_layer_idx and "causal" not in cfg.attn_cfg:
            warn(f"{where}: attn_cfg has no \"causal\", so attention layers {list(cfg.attn_layer_idx)} are "
                 "NON-causal (mamba_ssm's MHA default) and see later tokens; add \"causal\": true if the "
                 "model was trained causal")
        return cfg

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
        return cls.from_dict(d, name=path.parent.name or "custom", where=str(path))

    def to_mamba_ssm_dict(self) -> dict:
        """Exactly the config.json mamba_ssm 2.x writes and reads: only MambaConfig's fields
        (ssm_cfg nested, holding only Mamba2 keyword arguments)."""
        ssm = {k: getattr(self, k) for k in _SSM_KEYS}
        ssm.update(A_init_range=list(self.A_init_range), layer="Mamba2")
        return {
            "d_model": self.d_model, "d_intermediate": self.d_intermediate, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm, "attn_layer_idx": list(self.attn_layer_idx),
            "attn_cfg": dict(self.attn_cfg), "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    def extras_dict(self) -> dict:
        """The fields mamba_ssm's MambaConfig cannot hold (EXTRA_FIELDS)."""
        return {k: getattr(self, k) for k in EXTRA_FIELDS}

    def to_dict(self) -> dict:
        """Everything that defines the model: the mamba_ssm dict plus our extras (for our own
        formats and fingerprints; from_dict reads it back)."""
        return {**self.to_mamba_ssm_dict(), **self.extras_dict()}


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Mamba2Config)}


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
