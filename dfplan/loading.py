"""Load and save Mamba-2 checkpoints: mamba_ssm format, transformers format, hub ids, presets.

Model arguments understood everywhere (`--model M`):
  preset:NAME            config only (e.g. preset:mamba2-1.3b); weights need --random-init
  DIR                    local directory with config.json + model.safetensors | pytorch_model.bin
  owner/name             Hugging Face hub id (downloaded when online)
Both checkpoint dialects load with strict key matching: mamba_ssm keys
(backbone.embedding.weight, ...) and transformers' Mamba2ForCausalLM keys
(backbone.embeddings.weight, HF config names), each config read with its writer's defaults
(README "Checkpoint compatibility" lists writers, versions and the tests that cover them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import EXTRA_FIELDS, Mamba2Config, check_no_dt_limit, parse_bool, parse_float, parse_int
from .errors import DfplanError, warn
from .fileio import atomic_path, write_json_atomic
from .model import Mamba2LM, build_model
from .packed import load_packed
from .tokenizer import load_tokenizer

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Beside a mamba_ssm config.json: the fields its MambaConfig cannot hold (config.EXTRA_FIELDS);
# mamba_ssm itself never reads this file.
EXTRA_FILE = "dfplan_extra.json"
MAMBA_SSM_EPS = 1e-5            # what mamba_ssm runs every norm with, whatever we store

# transformers Mamba2Config name -> ours
_HF_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
    "state_size": "d_state", "expand": "expand", "conv_kernel": "d_conv", "n_groups": "ngroups",
    "head_dim": "headdim", "chunk_size": "chunk_size", "use_bias": "bias", "use_conv_bias": "conv_bias",
    "layer_norm_epsilon": "norm_epsilon", "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings", "time_step_min": "dt_min", "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
}
# Keys transformers 4.4x / 5.x write that do not change the model's outputs (tokens ids,
# init-only settings, bookkeeping), or that its Mamba2 ignores (rms_norm, norm_before_gate:
# its mixer always gates before the norm, as we do). Checked ones: num_heads,
# intermediate_size, hidden_act, time_step_limit.
_HF_IGNORED = {
    "model_type", "architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "use_cache", "initializer_range", "rescale_prenorm_residual", "time_step_rank",
    "time_step_init_scheme", "time_step_scale", "rms_norm", "norm_before_gate", "output_hidden_states",
    "output_attentions", "return_dict", "torchscript", "id2label", "label2id", "problem_type",
    "tokenizer_class", "is_encoder_decoder", "is_decoder", "add_cross_attention", "pruned_heads",
    "chunk_size_feed_forward", "tie_encoder_decoder", "finetuning_task", "prefix",
    "task_specific_params", "max_length", "num_heads", "intermediate_size", "hidden_act",
    "time_step_limit",
}
# transformers' Mamba2Config default (4.4x and 5.x alike): a config without the key is untied.
HF_TIE_DEFAULT = False


def is_hf_config(d: dict) -> bool:
    return d.get("model_type") == "mamba2" or "hidden_size" in d


def config_from_hf(d: dict, name: str = "custom", where: str = "config") -> Mamba2Config:
    """transformers' Mamba2Config (as 4.4x and 5.x write it) -> ours, read as transformers reads it."""
    if "time_step_limit" in d and d["time_step_limit"] is not None:
        check_no_dt_limit(d["time_step_limit"], "time_step_limit", where)
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise DfplanError(f"hidden_act={act!r} in {where} is not supported (only silu)")
    kw = {ours: Mamba2Config.parse_field(ours, d[hf], hf, where) for hf, ours in _HF_FIELDS.items() if hf in d}
    kw.setdefault("tie_embeddings", HF_TIE_DEFAULT)
    if "vocab_size" not in d:
        raise DfplanError(f"{where} has no vocab_size")
    V = parse_int(d["vocab_size"], "vocab_size", where)
    kw["pad_vocab_size_multiple"] = 16 if V % 16 == 0 else 1     # HF embeddings are not padded further
    unknown = sorted(k for k in d if k not in _HF_FIELDS and k not in _HF_IGNORED)
    if unknown:
        warn(f"{where}: ignoring keys dfplan does not understand: {', '.join(unknown)}")
    if parse_bool(d.get("norm_before_gate", False), "norm_before_gate", where):
        warn(f"{where}: norm_before_gate=true is ignored, as transformers' Mamba2 ignores it "
             "(it gates before the norm)")
    cfg = Mamba2Config.from_fields(kw, name, where)
    for key, derived in (("num_heads", cfg.nheads), ("intermediate_size", cfg.d_inner)):
        if key in d and parse_int(d[key], key, where) != derived:
            raise DfplanError(f"inconsistent config {where}: {key}={d[key]} but hidden_size, expand "
                              f"and head_dim give {derived}")
    return cfg


def config_to_hf(cfg: Mamba2Config) -> dict:
    if cfg.attn_layer_idx or cfg.d_intermediate:
        raise DfplanError("the transformers Mamba2 format has no attention/MLP layers; save as mamba_ssm")
    if cfg.D_has_hdim or cfg.norm_before_gate:
        raise DfplanError("the transformers Mamba2 format has no D_has_hdim / norm_before_gate; "
                          "save as mamba_ssm")
    d = {ours_hf: getattr(cfg, ours) for ours_hf, ours in _HF_FIELDS.items()}
    # time_step_limit as [0, Infinity] (4.4x's spelling): 5.x reads it too, while 4.4x cannot
    # read 5.x's {"__float__": "Infinity"}.
    d.update(model_type="mamba2", architectures=["Mamba2ForCausalLM"], vocab_size=cfg.vocab_padded,
             num_heads=cfg.nheads, time_step_limit=[0.0, float("inf")], rescale_prenorm_residual=False,
             hidden_act="silu", norm_before_gate=False, rms_norm=True)
    return d


def resolve_model_dir(model_arg: str) -> Path:
    p = Path(model_arg).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DfplanError(f"model path {p} is a file; pass the directory holding config.json")
        return p
    if model_arg.count("/") == 1 and not model_arg.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(model_arg, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
        except Exception as e:  # offline, unknown repo, ...
            raise DfplanError(f"cannot fetch {model_arg!r} from the Hugging Face hub ({type(e).__name__}); "
                              "pass a local directory or preset:NAME") from None
    raise DfplanError(f"model {model_arg!r} is neither a directory, a hub id nor preset:NAME")


def load_config(model_arg: str) -> Mamba2Config:
    """Config for preset:NAME, a local checkpoint directory or a hub id."""
    if model_arg.startswith("preset:"):
        return Mamba2Config.preset(model_arg)
    d = resolve_model_dir(model_arg)
    path = d / "config.json"
    if not path.exists():
        raise DfplanError(f"{d} has no config.json; is it a Mamba-2 checkpoint directory?")
    raw = _json_object(path, "config")
    if "dfplan_config" in raw:             # our packed checkpoints nest the model config
        raw = raw["dfplan_config"]
    elif is_hf_config(raw):
        return config_from_hf(raw, d.name, str(path))
    return Mamba2Config.from_dict({**raw, **read_extras(d)}, d.name, str(path))


def _json_object(path: Path, what: str = "") -> dict:
    """A JSON object from `path`, or one error line naming the file."""
    label = f"{what} {path}" if what else str(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DfplanError(f"malformed {label}: {e}") from None
    if not isinstance(d, dict):
        raise DfplanError(f"malformed {label}: not a JSON object")
    return d


def read_extras(d: Path) -> dict:
    """The EXTRA_FILE beside a mamba_ssm config.json ({} when absent)."""
    path = d / EXTRA_FILE
    if not path.exists():
        return {}
    extra = _json_object(path)
    unknown = sorted(set(extra) - set(EXTRA_FIELDS))
    if unknown:
        warn(f"{path}: ignoring keys dfplan does not understand: {', '.join(unknown)}")
    if "norm_epsilon" in extra:
        parse_float(extra["norm_epsilon"], "norm_epsilon", str(path))
    return {k: v for k, v in extra.items() if k in EXTRA_FIELDS}


def read_state_dict(d: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        f = d / name
        if f.exists():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    return load_file(str(f))
                return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise DfplanError(f"cannot read weights {f}: {e}") from None
    raise DfplanError(f"{d} has no weights ({' or '.join(WEIGHT_FILES)})")


def normalize_keys(sd: dict, cfg: Mamba2Config) -> dict:
    """transformers keys -> mamba_ssm keys; drop the tied lm_head copy."""
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone.embeddings."):
            k = "backbone.embedding." + k[len("backbone.embeddings."):]
        out[k] = v
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def check_keys(model: torch.nn.Module, sd: dict, where: str) -> None:
    expected = set(model.state_dict().keys())
    got = set(sd)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
        raise DfplanError(f"checkpoint {where} does not match its config: " + "; ".join(parts))
    shapes = model.state_dict()
    bad = [f"{k} {tuple(sd[k].shape)} != {tuple(shapes[k].shape)}" for k in sorted(sd)
           if tuple(sd[k].shape) != tuple(shapes[k].shape)]
    if bad:
        raise DfplanError(f"checkpoint {where} has wrong shapes: {bad[:4]}")


def load_model(model_arg: str, random_init: bool = False, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, seed: int = 0):
    """-> (Mamba2LM in eval mode, tokenizer or None). Builds on meta, then assign-loads."""
    cfg = load_config(model_arg)
    if random_init:
        torch.manual_seed(seed)
        model = build_model(cfg, device=device, dtype=dtype, seed=seed)
        return model.eval(), None
    if model_arg.startswith("preset:"):
        raise DfplanError(f"{model_arg} has no weights; add --random-init for size/latency work")
    d = resolve_model_dir(model_arg)
    sd = normalize_keys(read_state_dict(d), cfg)
    model = build_model(cfg, device="meta")
    check_keys(model, sd, str(d))
    target = dtype or next(iter(sd.values())).dtype
    sd = {k: v.to(device=device or "cpu", dtype=target if v.is_floating_point() else v.dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    tok = None
    if (d / "tokenizer.json").exists():
        tok = load_tokenizer(str(d / "tokenizer.json"))
    return model.eval(), tok


def save_mamba_ssm(model: Mamba2LM, out_dir: str | os.PathLike, tokenizer=None,
                   safetensors: bool = False) -> Path:
    """config.json (mamba_ssm's MambaConfig fields only) + pytorch_model.bin (or model.safetensors)
    with mamba_ssm keys, + EXTRA_FILE with what MambaConfig cannot hold."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file
        with atomic_path(out / "model.safetensors") as tmp:
            save_file(sd, str(tmp))
    else:
        if model.config.tie_embeddings:   # mamba_ssm state dicts carry the tied head too
            sd["lm_head.weight"] = sd["backbone.embedding.weight"]
        with atomic_path(out / "pytorch_model.bin") as tmp:
            torch.save(sd, tmp)
    cfg = model.config
    if cfg.norm_epsilon != MAMBA_SSM_EPS:
        warn(f"norm_epsilon={cfg.norm_epsilon} has no place in mamba_ssm's config (it always uses "
             f"{MAMBA_SSM_EPS}); dfplan keeps it in {out / EXTRA_FILE}")
    write_json_atomic(out / EXTRA_FILE, cfg.extras_dict())
    write_json_atomic(out / "config.json", cfg.to_mamba_ssm_dict())
    if tokenizer is not None:
        with atomic_path(out / "tokenizer.json") as tmp:
            tokenizer.save(str(tmp))
    return out


def save_hf(model: Mamba2LM, out_dir: str | os.PathLike) -> Path:
    """transformers Mamba2ForCausalLM layout: HF config names, backbone.embeddings keys."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.embedding."):
            k = "backbone.embeddings." + k[len("backbone.embedding."):]
        sd[k] = v.detach().clone().contiguous()
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embeddings.weight"].clone()
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    write_json_atomic(out / "config.json", config_to_hf(model.config))
    return out


def load_any(model_arg: str, dtype: torch.dtype | None = None, device=None):
    """A packed dfplan artifact (has manifest.json) or an FP checkpoint -> (model, tokenizer)."""
    p = Path(model_arg).expanduser()
    if p.is_dir() and (p / "manifest.json").exists():
        model = load_packed(p)
        tok = None
        if (p / "tokenizer.json").exists():
            tok = load_tokenizer(str(p / "tokenizer.json"))
        return model.eval(), tok
    return load_model(model_arg, dtype=dtype, device=device)
