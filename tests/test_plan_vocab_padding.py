"""A plan for a preset fits the same model read from a transformers-layout folder, whose
vocab_size is the padded count (bench e2e's reference checkpoint); another model is refused."""
import pytest
import torch

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.layouts import layout_plan
from dfplan.formats.plan import Plan
from dfplan.formats.size import plan_bytes
from dfplan.loading import config_from_hf, config_to_hf


def test_preset_plan_resolves_on_its_padded_transformers_config():
    cfg = Mamba2Config.preset("preset:mamba2-1.3b")
    hf = config_from_hf(config_to_hf(cfg))          # what bench e2e's reference checkpoint reads as
    assert hf.vocab_size != cfg.vocab_size and hf.vocab_padded == cfg.vocab_padded
    plan = Plan.from_dict(layout_plan("dfssm", cfg).to_dict())
    assert plan.model["vocab_size"] == cfg.vocab_size
    assert plan.resolve(hf) == plan.resolve(cfg)
    # and the other way round: a plan written on the transformers folder fits the preset
    back = layout_plan("dfssm", hf)
    assert back.resolve(cfg) == back.resolve(hf)


def test_plan_for_another_model_is_still_refused():
    cfg = Mamba2Config.preset("preset:mamba2-1.3b")
    hf = config_from_hf(config_to_hf(cfg))
    other = layout_plan("dfssm", Mamba2Config.preset("preset:mamba2-130m"))
    with pytest.raises(DfplanError, match="different model: d_model=768 in the plan but 2048"):
        other.resolve(hf)
    # a vocabulary whose padded rows differ is another model too
    bigger = Mamba2Config.preset("preset:mamba2-1.3b").replace(vocab_size=50_300)
    with pytest.raises(DfplanError, match=r"vocab_size=50277 in the plan but 50300 .*50,304 embedding rows.*plan.s would be 50288"):
        layout_plan("dfssm", cfg).resolve(bigger)
    unpadded = cfg.replace(vocab_size=50_280, pad_vocab_size_multiple=1)        # 50,280 rows, not 50,288
    with pytest.raises(DfplanError, match="vocab_size=50277 in the plan"):
        layout_plan("dfssm", cfg).resolve(unpadded)


def test_bench_e2e_accepts_a_search_plan_for_a_padded_vocab(tmp_path, monkeypatch):
    """The reported failure, end to end on a tiny model: search writes a plan for a checkpoint
    whose vocab (250) is padded (to 256); bench e2e packs its transformers-layout reference
    (vocab_size 256) with that plan."""
    from dfplan.loading import save_mamba_ssm
    from dfplan.model import build_model

    monkeypatch.setenv("DFPLAN_PEERS_DIR", str(tmp_path / "no-peers"))
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=250, d_state=16, headdim=16, chunk_size=16,
                       name="t64v250")
    assert cfg.vocab_padded == 256
    model_dir = save_mamba_ssm(build_model(cfg, seed=0).eval(), tmp_path / "t64", safetensors=True)
    budget = plan_bytes(cfg, layout_plan("int8", cfg)).total_bytes
    assert main(["search", "--model", str(model_dir), "--prior", "--budget", str(budget),
                 "--out", str(tmp_path / "run")]) == 0
    assert Plan.from_json(tmp_path / "run" / "plan.json").model["vocab_size"] == 250
    threads = torch.get_num_threads()
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--model", str(model_dir), "--variants", "dfplan-packed",
               "--plan", str(tmp_path / "run" / "plan.json"), "--prompt-len", "8", "--gen", "2",
               "--batch", "1", "--min-samples", "2", "--min-time", "0", "--warmup", "0", "--no-isolate",
               "--threads", "1", "--bandwidth-mib", "16", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(out)])
    torch.set_num_threads(threads)
    assert rc == 0
    from dfplan.bench import schema
    res = schema.load(out)
    v = res["variants"]["dfplan-packed"]
    assert v["status"] == "ok", v
    assert v["model_bytes"] > 0
