"""Checkpoints in both dialects load strictly and give the logits of the model that wrote them."""
import json

import pytest
import torch

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.loading import load_config, load_model, save_hf, save_mamba_ssm
from dfplan.model import build_model


def _ids(n=37, seed=0):
    return torch.randint(0, 4096, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["mamba_ssm_bin", "mamba_ssm_safetensors", "hf"])
def test_roundtrip_identical_logits(tmp_path, tiny_model, fmt):
    if fmt == "hf":
        save_hf(tiny_model, tmp_path)
    else:
        save_mamba_ssm(tiny_model, tmp_path, safetensors=fmt.endswith("safetensors"))
    loaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(_ids()), tiny_model(_ids()))
    assert loaded.config.vocab_padded == tiny_model.config.vocab_padded


def test_mamba_ssm_state_dict_has_reference_keys(tmp_path, tiny_model):
    save_mamba_ssm(tiny_model, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    for k in ["backbone.embedding.weight", "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.in_proj.weight",
              "backbone.layers.0.mixer.conv1d.weight", "backbone.layers.0.mixer.conv1d.bias",
              "backbone.layers.0.mixer.dt_bias", "backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D",
              "backbone.layers.0.mixer.norm.weight", "backbone.layers.0.mixer.out_proj.weight",
              "backbone.norm_f.weight", "lm_head.weight"]:
        assert k in sd, k
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["d_model"] == 128


def test_hybrid_roundtrip(tmp_path):
    cfg = Mamba2Config.preset("tiny").replace(d_intermediate=64, attn_layer_idx=(2,),
                                              attn_cfg={"num_heads": 4, "rotary_emb_dim": 16, "causal": True})
    m = build_model(cfg, seed=1).eval()
    save_mamba_ssm(m, tmp_path)
    loaded, _ = load_model(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(_ids(20)), m(_ids(20)))


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_model):
    save_mamba_ssm(tiny_model, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.9.mixer.bogus"] = torch.ones(3)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(DfplanError) as e:
        load_model(str(tmp_path))
    msg = str(e.value)
    assert "backbone.layers.1.mixer.D" in msg and "backbone.layers.9.mixer.bogus" in msg
    assert "\n" not in msg


def test_shape_mismatch_is_refused(tmp_path, tiny_model):
    save_mamba_ssm(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DfplanError, match="wrong shapes"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("text,msg", [("{not json", "malformed config"), ("[1, 2]", "not a JSON object"),
                                      ('{"d_model": "big", "n_layer": 2}', "cannot parse d_model")])
def test_malformed_config(tmp_path, text, msg):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(DfplanError, match=msg):
        load_config(str(tmp_path))


def test_bad_model_arguments(tmp_path):
    with pytest.raises(DfplanError, match="unknown preset"):
        load_config("preset:mamba2-7b")
    with pytest.raises(DfplanError, match="no config.json"):
        load_config(str(tmp_path))
    with pytest.raises(DfplanError, match="random-init"):
        load_model("preset:tiny")
    with pytest.raises(DfplanError, match="neither a directory"):
        load_config("./does/not/exist")


def test_random_init_preset_has_real_shapes():
    model, tok = load_model("preset:tiny", random_init=True)
    assert tok is None and model.backbone.embedding.weight.shape == (4096, 128)
    assert model.backbone.layers[0].mixer.in_proj.weight.std() > 0


def test_matches_transformers_mamba2(tmp_path, monkeypatch):
    """A real peer: transformers' Mamba2ForCausalLM (torch path) on the same random weights."""
    transformers = pytest.importorskip("transformers")
    import importlib.util
    assert importlib.util.find_spec("mamba_ssm") is None, "mamba_ssm must not be importable here"
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, ngroups=2)
    ours = build_model(cfg, seed=3).eval()
    save_hf(ours, tmp_path)
    peer = transformers.Mamba2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = _ids(45, seed=2)                      # 45 is not a multiple of the chunk size
    with torch.no_grad():
        a, b = ours(ids), peer(ids).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-4
