"""Load and save Mamba-2 checkpoints: mamba_ssm format, transformers format, hub ids, presets.

Model arguments understood everywhere (`--model M`):
  preset:NAME            config only (e.g. preset:mamba2-1.3b); weights need --random-init
  DIR                    local directory with config.json + model.safetensors | pytorch_model.bin
  owner/name             Hugging Face hub id (downloaded when online)
Both checkpoint dialects load with strict key matching: mamba_ssm keys
(backbone.embedding.weight, ...) and transformers' Mamba2ForCausalLM keys
(backbone.embeddings.weight, HF config names).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import Mamba2Config
from .errors import DfplanError
from .fileio import atomic_path, write_json_atomic
from .model import Mamba2LM, build_model

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# transformers Mamba2Config name -> ours
_HF_FIELDS = {
    "hidden_size": "d_model", "num_hidden_layers": "n_layer", "vocab_size": "vocab_size",
    "state_size": "d_state", "expand": "expand", "conv_kernel": "d_conv", "n_groups": "ngroups",
    "head_dim": "headdim", "chunk_size": "chunk_size", "use_bias": "bias", "use_conv_bias": "conv_bias",
    "layer_norm_epsilon": "norm_epsilon", "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings", "time_step_min": "dt_min", "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
}


def is_hf_config(d: dict) -> bool:
    return d.get("model_type") == "mamba2" or "hidden_size" in d


def config_from_hf(d: dict, name: str = "custom") -> Mamba2Config:
    lim = d.get("time_step_limit", (0.0, float("inf")))
    if lim is not None and (float(lim[0]) != 0.0 or float(lim[1]) != float("inf")):
        raise DfplanError(f"time_step_limit={lim} is not supported (only (0, inf))")
    kw = {ours: d[hf] for hf, ours in _HF_FIELDS.items() if hf in d}
    V = int(d["vocab_size"])
    kw["pad_vocab_size_multiple"] = 16 if V % 16 == 0 else 1     # HF embeddings are not padded further
    cfg = Mamba2Config(**kw, name=name)
    if "num_heads" in d and int(d["num_heads"]) != cfg.nheads:
        raise DfplanError(f"inconsistent HF config: num_heads={d['num_heads']} but "
                          f"hidden_size*expand/head_dim={cfg.nheads}")
    return cfg


def config_to_hf(cfg: Mamba2Config) -> dict:
    if cfg.attn_layer_idx or cfg.d_intermediate:
        raise DfplanError("the transformers Mamba2 format has no attention/MLP layers; save as mamba_ssm")
    d = {ours_hf: getattr(cfg, ours) for ours_hf, ours in _HF_FIELDS.items()}
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
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DfplanError(f"malformed config {path}: {e}") from None
    if not isinstance(raw, dict):
        raise DfplanError(f"malformed config {path}: not a JSON object")
    if "dfplan_config" in raw:             # our packed checkpoints nest the model config
        raw = raw["dfplan_config"]
    return config_from_hf(raw, d.name) if is_hf_config(raw) else Mamba2Config.from_dict(raw, d.name)


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
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(str(d / "tokenizer.json"))
    return model.eval(), tok


def save_mamba_ssm(model: Mamba2LM, out_dir: str | os.PathLike, tokenizer=None,
                   safetensors: bool = False) -> Path:
    """config.json + pytorch_model.bin (or model.safetensors) with mamba_ssm keys."""
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
    write_json_atomic(out / "config.json", model.config.to_mamba_ssm_dict())
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
        from .packed import load_packed
        model = load_packed(p)
        tok = None
        if (p / "tokenizer.json").exists():
            from .tokenizer import load_tokenizer
            tok = load_tokenizer(str(p / "tokenizer.json"))
        return model.eval(), tok
    return load_model(model_arg, dtype=dtype, device=device)
