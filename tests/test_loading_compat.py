"""Checkpoints written by the peers' own code load as the peers run them, and what we write
is what the peers read.

transformers (a dev dependency, CPU torch path) writes its folders with save_pretrained here
and is the logits reference; transformers 4.4x and mamba_ssm are not installable next to it,
so their conventions are written down below, each with the file and version it comes from.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from dfplan import cli
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.layouts import layout_plan
from dfplan.loading import EXTRA_FILE, HF_TIE_DEFAULT, load_config, load_model, save_hf, save_mamba_ssm
from dfplan.model import build_model
from dfplan.packed import load_packed, save_packed

transformers = pytest.importorskip("transformers")

TOL = 1e-4          # max |ours - theirs| / max |theirs| over all logits

# mamba_ssm 2.2.x, mamba_ssm/models/config_mamba.py: the MambaConfig dataclass (name: default).
# MambaLMHeadModel.from_pretrained calls MambaConfig(**config_json), so any other key raises.
MAMBA_SSM_CONFIG = {
    "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {},
    "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
    "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}
# mamba_ssm 2.2.x, mamba_ssm/modules/mamba2.py: Mamba2.__init__ keyword arguments. ssm_cfg is
# passed there as **kwargs (models/mixer_seq_simple.py create_block pops "layer" first).
MAMBA2_KWARGS = {
    "d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
    "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit",
    "bias", "conv_bias", "chunk_size", "use_mem_eff_path", "layer_idx", "process_group",
    "sequence_parallel", "device", "dtype",
}
# mamba_ssm 2.2.x, mamba_ssm/modules/mha.py: MHA.__init__ keyword arguments (attn_cfg); its
# causal defaults to False.
MHA_KWARGS = {
    "num_heads", "num_heads_kv", "head_dim", "mlp_dim", "qkv_proj_bias", "out_proj_bias",
    "softmax_scale", "causal", "layer_idx", "d_conv", "rotary_emb_dim", "rotary_emb_base",
    "rotary_emb_interleaved", "device", "dtype",
}

# config.json exactly as transformers 4.46.3 save_pretrained wrote it (captured from a real
# run: Mamba2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=16,
# head_dim=16, num_heads=4, n_groups=1, chunk_size=8, layer_norm_epsilon=1e-3)); 4.4x spells
# the infinite limit as a bare Infinity and writes rms_norm / torch_dtype, 5.x does not.
TRANSFORMERS_4_CONFIG = """{
  "architectures": [
    "Mamba2ForCausalLM"
  ],
  "bos_token_id": 0,
  "chunk_size": 8,
  "conv_kernel": 4,
  "eos_token_id": 2,
  "expand": 2,
  "head_dim": 16,
  "hidden_act": "silu",
  "hidden_size": 32,
  "initializer_range": 0.1,
  "layer_norm_epsilon": 0.001,
  "model_type": "mamba2",
  "n_groups": 1,
  "num_heads": 4,
  "num_hidden_layers": 2,
  "pad_token_id": 1,
  "rescale_prenorm_residual": false,
  "residual_in_fp32": true,
  "rms_norm": true,
  "state_size": 16,
  "tie_word_embeddings": false,
  "time_step_floor": 0.0001,
  "time_step_limit": [
    0.0,
    Infinity
  ],
  "time_step_max": 0.1,
  "time_step_min": 0.001,
  "time_step_rank": 2,
  "torch_dtype": "float32",
  "transformers_version": "4.46.3",
  "use_bias": false,
  "use_cache": true,
  "use_conv_bias": true,
  "vocab_size": 100
}
"""

# Random transformers configs: n_groups 1 and 2, tied and untied, epsilons, biases, vocab sizes
# that are and are not multiples of 16.
HF_CASES = {
    "g1-tied-eps1e-3-bias": dict(n_groups=1, tie_word_embeddings=True, layer_norm_epsilon=1e-3,
                                 use_bias=True, vocab_size=100),
    "g2-untied-noconvbias": dict(n_groups=2, tie_word_embeddings=False, use_conv_bias=False, vocab_size=128),
    "g2-tied-eps1e-4-bias": dict(n_groups=2, tie_word_embeddings=True, layer_norm_epsilon=1e-4,
                                 use_bias=True, vocab_size=96, head_dim=8, num_heads=8),
    "g1-untied-eps1e-6": dict(n_groups=1, tie_word_embeddings=False, layer_norm_epsilon=1e-6, vocab_size=77),
}


def _hf_model(seed=0, **kw):
    """A transformers Mamba2ForCausalLM with every parameter moved off its init (norm weights
    not 1, D not 1, ...), so each of them matters to the logits."""
    args = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, state_size=16, head_dim=16,
                num_heads=4, n_groups=1, chunk_size=8)
    args.update(kw)
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**args)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.endswith(("norm.weight", ".D")) else 0.05
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _ids(vocab, n=21, seed=0):           # 21: crosses two chunk boundaries of 8, ends mid-chunk
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def _rel(ours, theirs):
    return ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()


def _versus_transformers(folder, vocab):
    """(max relative logits difference, ours, theirs) of the two loaders on one folder."""
    ours, _ = load_model(str(folder))
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(str(folder)).eval()
    ids = _ids(vocab)
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.shape == b.shape
    return _rel(a, b), ours, a


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


# transformers 5.x ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(HF_CASES))
def test_transformers5_save_pretrained_matches_its_logits(tmp_path, case):
    kw = HF_CASES[case]
    _hf_model(seed=len(case), **kw).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["time_step_limit"][1] == {"__float__": "Infinity"}    # how 5.x writes it
    rel, ours, logits = _versus_transformers(tmp_path, kw["vocab_size"])
    print(f"\n[{case}] max relative logits difference vs transformers {transformers.__version__}: {rel:.2e}")
    assert rel < TOL
    cfg = ours.config
    assert cfg.tie_embeddings == kw["tie_word_embeddings"] and (ours.lm_head is None) == cfg.tie_embeddings
    assert cfg.norm_epsilon == kw.get("layer_norm_epsilon", 1e-5)
    assert all(m.eps == cfg.norm_epsilon for n, m in ours.named_modules() if n.endswith("mixer.norm"))
    if cfg.norm_epsilon >= 1e-3:     # the test can see a wrong epsilon in the gated norm
        for n, m in ours.named_modules():
            if n.endswith("mixer.norm"):
                m.eps = 1e-5
        with torch.no_grad():
            assert _rel(ours(_ids(kw["vocab_size"])), logits) > 10 * TOL


def test_transformers_config_without_tie_key_is_untied(tmp_path):
    assert transformers.Mamba2Config().tie_word_embeddings is HF_TIE_DEFAULT is False
    _hf_model(seed=5, tie_word_embeddings=False).save_pretrained(tmp_path)
    _edit_json(tmp_path / "config.json", tie_word_embeddings=None)
    rel, ours, _ = _versus_transformers(tmp_path, 100)
    assert not ours.config.tie_embeddings and rel < TOL


def test_transformers4_config_reads_as_transformers_reads_it(tmp_path):
    """The 4.46.3 config text over weights of the same shapes; transformers 5 is the reference
    (4.46.3's own CPU path clamps dt at time_step_min and drifts after the first chunk)."""
    _hf_model(seed=7, layer_norm_epsilon=1e-3, tie_word_embeddings=False).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(TRANSFORMERS_4_CONFIG)
    rel, ours, _ = _versus_transformers(tmp_path, 100)
    print(f"\n[transformers-4.46.3 config] max relative logits difference: {rel:.2e}")
    assert rel < TOL
    assert ours.config.norm_epsilon == 1e-3 and not ours.config.tie_embeddings


def test_save_hf_is_read_by_transformers(tmp_path):
    cfg = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16,
                                              chunk_size=8, ngroups=2, bias=True, norm_epsilon=1e-3,
                                              tie_embeddings=False)
    ours = build_model(cfg, seed=2).eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(("norm.weight", ".D")):
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    save_hf(ours, tmp_path)
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert theirs.config.layer_norm_epsilon == 1e-3 and not theirs.config.tie_word_embeddings
    with torch.no_grad():
        assert _rel(ours(_ids(256)), theirs(_ids(256)).logits) < TOL


def test_size_cli_on_a_transformers5_folder(tmp_path, capsys):
    model = _hf_model(seed=3, tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    rc = cli.main(["size", "--model", str(tmp_path), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    n_params = sum(p.numel() for p in model.parameters())       # tied head counted once
    assert sum(c["params"] for c in report["components"]) == n_params
    assert report["total_bytes"] == 2 * n_params                 # default layout: fp16


# mamba_ssm 2.x ------------------------------------------------------------------------------
def _mamba_ssm_accepts(config_json: dict) -> None:
    """What MambaLMHeadModel.from_pretrained does with config.json, minus the CUDA parts:
    MambaConfig(**config), then Mamba2(**ssm_cfg) and MHA(**attn_cfg) keyword checks."""
    mamba_config = dataclasses.make_dataclass(
        "MambaConfig", [(k, object, dataclasses.field(default_factory=lambda v=v: v))
                        for k, v in MAMBA_SSM_CONFIG.items()])
    c = mamba_config(**config_json)                              # TypeError on any other key
    ssm = dict(c.ssm_cfg)
    assert ssm.pop("layer", "Mamba1") == "Mamba2"
    assert set(ssm) <= MAMBA2_KWARGS, set(ssm) - MAMBA2_KWARGS
    assert set(c.attn_cfg) <= MHA_KWARGS, set(c.attn_cfg) - MHA_KWARGS


def test_mamba_ssm_reads_what_we_write(tmp_path, capsys):
    cfg = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=3, d_state=16, headdim=16, chunk_size=8,
                                              norm_epsilon=1e-3, d_intermediate=64, attn_layer_idx=(1,),
                                              attn_cfg={"num_heads": 4, "causal": True, "rotary_emb_dim": 8})
    model = build_model(cfg, seed=4).eval()
    save_mamba_ssm(model, tmp_path)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "norm_epsilon" in err
    written = json.loads((tmp_path / "config.json").read_text())
    _mamba_ssm_accepts(written)
    assert "norm_epsilon" not in written
    assert json.loads((tmp_path / EXTRA_FILE).read_text()) == {"norm_epsilon": 1e-3}
    loaded, _ = load_model(str(tmp_path))
    ids = _ids(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    # without our extra file, the model is the one mamba_ssm runs: eps 1e-5
    (tmp_path / EXTRA_FILE).unlink()
    assert load_config(str(tmp_path)).norm_epsilon == 1e-5


def test_packed_format_keeps_the_epsilon(tmp_path):
    """Our packed format holds what mamba_ssm's config cannot (Mamba2Config.to_dict)."""
    cfg = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, d_state=16, headdim=16, norm_epsilon=1e-3)
    model = build_model(cfg, seed=8).eval()
    d = save_packed(model, layout_plan("fp16", cfg), tmp_path / "p")
    loaded = load_packed(d)
    assert loaded.config.norm_epsilon == 1e-3 and load_config(str(d)).norm_epsilon == 1e-3
    with torch.no_grad():
        assert _rel(loaded(_ids(4096)), model(_ids(4096))) < 1e-2          # fp16 weights


def test_mamba_ssm_config_without_tie_key_is_tied(tmp_path, tiny_model):
    save_mamba_ssm(tiny_model, tmp_path)
    _edit_json(tmp_path / "config.json", tie_embeddings=None)
    assert MAMBA_SSM_CONFIG["tie_embeddings"] is True
    loaded, _ = load_model(str(tmp_path))
    assert loaded.config.tie_embeddings and loaded.lm_head is None
    with torch.no_grad():
        assert torch.equal(loaded(_ids(4096)), tiny_model(_ids(4096)))


@pytest.mark.parametrize("causal", [None, True])
def test_attention_without_causal_is_non_causal_with_a_warning(tmp_path, capsys, causal):
    attn = {"num_heads": 4, "rotary_emb_dim": 8, **({} if causal is None else {"causal": causal})}
    cfg = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, d_state=16, headdim=16, chunk_size=8,
                                              attn_layer_idx=(0,), attn_cfg=attn)
    save_mamba_ssm(build_model(cfg, seed=6), tmp_path)
    capsys.readouterr()
    loaded, _ = load_model(str(tmp_path))
    err = capsys.readouterr().err
    assert loaded.backbone.layers[0].mixer.causal is bool(causal)
    if causal is None:
        assert err.count("\n") == 1 and "NON-causal" in err and "[0]" in err
    else:
        assert err == ""
    ids = _ids(4096, n=12)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 4096
    with torch.no_grad():
        first_moves = not torch.allclose(loaded(ids)[:, 0], loaded(changed)[:, 0])
    assert first_moves is (causal is None)       # a later token reaches position 0 only if non-causal


# unknown keys and unparsable values -------------------------------------------------------
def test_unknown_keys_are_one_warning_line(tmp_path, capsys, tiny_model):
    hf = tmp_path / "hf"
    _hf_model(seed=1).save_pretrained(hf)
    _edit_json(hf / "config.json", frobnicate=1, zzz_extra="x")
    capsys.readouterr()
    load_config(str(hf))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "frobnicate" in err and "zzz_extra" in err and str(hf / "config.json") in err

    ms = tmp_path / "ms"
    save_mamba_ssm(tiny_model, ms)
    d = json.loads((ms / "config.json").read_text())
    d["frobnicate"] = 1
    d["ssm_cfg"]["warp"] = 2
    (ms / "config.json").write_text(json.dumps(d))
    capsys.readouterr()
    assert load_config(str(ms)).d_model == tiny_model.config.d_model
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "frobnicate" in err and "ssm_cfg.warp" in err


def _hf_folder(tmp_path):
    _hf_model(seed=2).save_pretrained(tmp_path)
    return tmp_path


def _ms_folder(tmp_path):
    cfg = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, d_state=16, headdim=16,
                                              attn_layer_idx=(1,), attn_cfg={"num_heads": 4, "causal": True})
    save_mamba_ssm(build_model(cfg, seed=0), tmp_path)
    return tmp_path


def _nested(key, value):
    outer, inner = key.split(".")
    return lambda d: {**d, outer: {**d[outer], inner: value}}


BAD_VALUES = [
    (_hf_folder, "time_step_limit", lambda d: {**d, "time_step_limit": [0.0, {"__float__": "banana"}]}),
    (_hf_folder, "hidden_size", lambda d: {**d, "hidden_size": "big"}),
    (_hf_folder, "layer_norm_epsilon", lambda d: {**d, "layer_norm_epsilon": [1e-5]}),
    (_hf_folder, "tie_word_embeddings", lambda d: {**d, "tie_word_embeddings": "yes"}),
    (_ms_folder, "d_model", lambda d: {**d, "d_model": 64.5}),
    (_ms_folder, "ssm_cfg.dt_limit", _nested("ssm_cfg.dt_limit", "none")),
    (_ms_folder, "attn_cfg.num_heads", _nested("attn_cfg.num_heads", "four")),
]


@pytest.mark.parametrize("make,key,edit", BAD_VALUES, ids=[f"{m.__name__[1:3]}-{k}" for m, k, _ in BAD_VALUES])
def test_unparsable_value_is_one_error_line_naming_key_and_file(tmp_path, capsys, make, key, edit):
    folder = make(tmp_path)
    path = folder / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    capsys.readouterr()
    rc = cli.main(["size", "--model", str(folder)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert key.split(".")[-1] in err and str(path) in err


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    folder = _hf_folder(tmp_path)
    _edit_json(folder / "config.json", state_size={"__float__": "Infinity"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "dfplan", "size", "--model", str(folder)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "state_size" in p.stderr


def test_config_errors_are_dfplan_errors():
    with pytest.raises(DfplanError, match="ssm_cfg.A_init_range"):
        Mamba2Config.from_dict({"d_model": 64, "ssm_cfg": {"A_init_range": [1, "x", 3]}}, where="cfg.json")
