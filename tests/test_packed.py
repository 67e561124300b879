"""Packed checkpoints: bit-identical round trip, exact payload size, refusal of damaged files."""
import json
import struct

import pytest
import torch

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.apply import apply_plan
from dfplan.formats.layouts import layout_plan
from dfplan.formats.plan import Plan, model_signature
from dfplan.formats.size import plan_bytes
from dfplan.formats.specs import Binary, IntN, Keep
from dfplan.model import build_model
from dfplan.packed import load_packed, save_packed
from dfplan.packed_files import verify_packed

HYBRID = Mamba2Config(d_model=64, n_layer=3, vocab_size=300, d_state=16, headdim=16, chunk_size=16,
                      attn_layer_idx=(1,), d_intermediate=96, tie_embeddings=False, bias=True,
                      attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8}, name="hybrid")
TINY = Mamba2Config.preset("tiny")


def mixed_plan(cfg):
    return Plan(specs={"*.in_proj": Binary("row", 8), "*.out_proj": IntN(4, 32, symmetric=False),
                       "backbone.layers.0.mixer.out_proj": Binary("fbi", 4, 4),
                       "backbone.embedding": IntN(8), "*.fc1": IntN(3), "lm_head": IntN(4)},
                default=Keep("fp16"), model=model_signature(cfg))


def compressed(cfg, plan, seed=0):
    model = build_model(cfg, seed=seed).eval()
    return apply_plan(model, plan, generator=torch.Generator().manual_seed(0))


def payload_on_disk(path) -> int:
    """safetensors file size minus its 8-byte length prefix and JSON header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, cfg, plan in (("tiny-dfssm", TINY, layout_plan("dfssm", TINY)),
                            ("hybrid-mixed", HYBRID, mixed_plan(HYBRID))):
        model = compressed(cfg, plan)
        d = save_packed(model, plan, tmp_path_factory.mktemp(name))
        out[name] = (model, plan, d)
    return out


@pytest.mark.parametrize("name", ["tiny-dfssm", "hybrid-mixed"])
def test_round_trip_bit_identical_and_same_logits(saved, name):
    model, plan, d = saved[name]
    loaded = load_packed(d)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config.to_mamba_ssm_dict() == model.config.to_mamba_ssm_dict()
    assert loaded.config.name == model.config.name


@pytest.mark.parametrize("name", ["tiny-dfssm", "hybrid-mixed"])
def test_written_payload_equals_accounted_size(saved, name):
    model, plan, d = saved[name]
    accounted = plan_bytes(model.config, plan).total_bytes
    written = payload_on_disk(d / "model.safetensors")
    assert written == accounted                       # exact, well inside the 0.5% asked for
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["payload_bytes"] == accounted and manifest["plan_hash"] == plan.hash()
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "plan.json"}
    assert {"dfplan", "torch", "safetensors"} <= set(manifest["versions"])


def test_load_builds_on_meta_without_initialising_fp_weights(saved, monkeypatch):
    import dfplan.model as m

    def boom(*a, **k):
        raise AssertionError("load_packed must not initialise FP weights")
    monkeypatch.setattr(m, "init_weights", boom)
    model, _, d = saved["tiny-dfssm"]
    loaded = load_packed(d)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert loaded.backbone.layers[0].mixer.in_proj.bits.dtype == torch.uint8


def test_load_any_and_load_config_understand_packed_dirs(saved):
    from dfplan.loading import load_any, load_config
    _, _, d = saved["hybrid-mixed"]
    assert load_config(str(d)).to_mamba_ssm_dict() == HYBRID.to_mamba_ssm_dict()
    model, tok = load_any(str(d))
    assert tok is None and model.lm_head.spec == IntN(4)


def copy_dir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_corrupted_file_is_refused_naming_it(saved, tmp_path):
    d = copy_dir(saved["tiny-dfssm"][2], tmp_path / "c")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(DfplanError, match=r"model\.safetensors fails its sha256 check"):
        load_packed(d)


def test_truncated_file_is_refused_naming_it(saved, tmp_path):
    d = copy_dir(saved["tiny-dfssm"][2], tmp_path / "t")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DfplanError, match=r"model\.safetensors is .* truncated"):
        load_packed(d)


@pytest.mark.parametrize("victim,old,new,match", [
    ("plan.json", '"int8"', '"int4"', r"plan\.json fails its sha256"),
    ("config.json", '"d_model": 128', '"d_model": 256', r"config\.json fails its sha256"),
    ("plan.json", '"int8"', '"int8" ', r"plan\.json is .* bytes but manifest\.json records"),
])
def test_edited_side_files_are_refused(saved, tmp_path, victim, old, new, match):
    d = copy_dir(saved["tiny-dfssm"][2], tmp_path / "e")
    f = d / victim
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))
    with pytest.raises(DfplanError, match=match):
        load_packed(d)


def test_missing_or_broken_manifest(saved, tmp_path):
    d = copy_dir(saved["tiny-dfssm"][2], tmp_path / "m")
    (d / "manifest.json").write_text("{")
    with pytest.raises(DfplanError, match=r"manifest\.json is corrupt"):
        load_packed(d)
    (d / "manifest.json").unlink()
    with pytest.raises(DfplanError, match=r"manifest\.json is missing"):
        verify_packed(d)
    with pytest.raises(DfplanError, match="does not exist"):
        load_packed(tmp_path / "nothing")


def test_bad_plan_writes_nothing(tmp_path):
    model = build_model(TINY, seed=0).eval()
    out = tmp_path / "never"
    bad = Plan(specs={"backbone.layers.12.mixer.in_proj": IntN(8)})
    with pytest.raises(DfplanError, match="backbone.layers.12"):
        save_packed(model, bad, out)
    with pytest.raises(DfplanError, match="rank"):
        save_packed(model, Plan(specs={"*.in_proj": Binary("row", 500)}), out)
    # a model compressed with one plan cannot be saved under another
    apply_plan(model, layout_plan("int8", TINY))
    with pytest.raises(DfplanError, match="plan"):
        save_packed(model, layout_plan("dfssm", TINY), out)
    assert not out.exists()


def test_resave_replaces_files_atomically(saved, tmp_path):
    model, plan, _ = saved["tiny-dfssm"]
    d = save_packed(model, plan, tmp_path / "r")
    first = (d / "manifest.json").read_text()
    save_packed(model, plan, d)
    assert not list(d.glob(".*.tmp")) and not list(d.glob("*.tmp"))
    verify_packed(d)
    a, b = json.loads(first), json.loads((d / "manifest.json").read_text())
    assert a["files"] == b["files"]                   # same model, same bytes: reproducible


def test_tokenizer_is_stored_and_checksummed(saved, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    tok = Tokenizer(WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    model, plan, _ = saved["tiny-dfssm"]
    d = save_packed(model, plan, tmp_path / "tok", tokenizer=tok)
    assert "tokenizer.json" in json.loads((d / "manifest.json").read_text())["files"]
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(DfplanError, match=r"tokenizer\.json"):
        verify_packed(d)
