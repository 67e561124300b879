"""Units from a config, plan resolution and validation, exact size accounting and `dfplan size`."""
import json
import math

import pytest

from dfplan.cli import main as cli_main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.layouts import layout_names, layout_plan
from dfplan.formats.plan import Plan, model_signature
from dfplan.formats.size import packed_layout, plan_bytes
from dfplan.formats.specs import Binary, IntN, Keep, parse_spec
from dfplan.formats.units import allowed_specs, compressible_units, fixed_tensors
from dfplan.model import build_model

C13 = Mamba2Config.preset("mamba2-1.3b")
HYBRID = Mamba2Config(d_model=64, n_layer=3, vocab_size=300, d_state=16, headdim=16, chunk_size=16,
                      attn_layer_idx=(1,), d_intermediate=96, tie_embeddings=False, bias=True,
                      attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "mlp_dim": 100})


def test_1p3b_parameter_breakdown_matches_mamba_ssm():
    units = compressible_units(C13)
    by_kind = {}
    for u in units:
        by_kind[u.kind] = by_kind.get(u.kind, 0) + u.numel
    assert by_kind == {"embedding": 102_989_824, "in_proj": 836_763_648, "out_proj": 402_653_184}
    fixed = {n: math.prod(s) for n, s in fixed_tensors(C13)}
    assert sum(v for k, v in fixed.items() if "conv1d" in k) == 1_044_480
    assert sum(v for k, v in fixed.items() if "norm" in k) == 296_960
    assert sum(v for k, v in fixed.items() if k.endswith(("A_log", ".D", "dt_bias"))) == 9_216
    assert sum(u.numel for u in units) + sum(fixed.values()) == 1_343_757_312


@pytest.mark.parametrize("cfg", [Mamba2Config.preset("tiny"), HYBRID], ids=["tiny", "hybrid"])
def test_units_and_fixed_tensors_cover_the_model_state_dict(cfg):
    sd = {k: tuple(v.shape) for k, v in build_model(cfg, device="meta").state_dict().items()}
    ours = {f"{u.name}.weight": u.shape for u in compressible_units(cfg)}
    ours.update({n: tuple(s) for n, s in fixed_tensors(cfg)})
    assert ours == sd


def test_hybrid_unit_kinds():
    kinds = [u.kind for u in compressible_units(HYBRID)]
    assert kinds.count("attn_in") == 1 and kinds.count("fc1") == 3 and kinds[-1] == "lm_head"
    assert compressible_units(HYBRID)[-1].block == HYBRID.n_layer


def test_allowed_specs():
    units = {u.kind: u for u in compressible_units(Mamba2Config.preset("tiny"))}
    emb, lin = allowed_specs(units["embedding"]), allowed_specs(units["in_proj"])
    assert emb(Keep("bf16")) and emb(IntN(4)) and not emb(IntN(4, 32)) and not emb(Binary())
    assert lin(Binary("row", 16)) and lin(IntN(4, 32)) and lin(Keep())
    assert not lin(Binary("row", 1000)) and not lin(IntN(4, 96))


# -- plans -----------------------------------------------------------------------------------

def tiny():
    return Mamba2Config.preset("tiny")


def test_resolve_precedence_exact_then_last_pattern():
    cfg = tiny()
    plan = Plan(specs={"*.in_proj": parse_spec("int8"), "backbone.layers.1.*": parse_spec("int4"),
                       "backbone.layers.1.mixer.in_proj": parse_spec("bin+r8")}, default=Keep("bf16"))
    r = plan.resolve(cfg)
    assert r["backbone.layers.0.mixer.in_proj"] == IntN(8)
    assert r["backbone.layers.1.mixer.in_proj"] == Binary("row", 8)      # exact wins
    assert r["backbone.layers.1.mixer.out_proj"] == IntN(4)              # later pattern wins
    assert r["backbone.layers.0.mixer.out_proj"] == Keep("bf16")         # default
    assert len(r) == len(compressible_units(cfg))


def test_shadowed_pattern_is_not_reported_missing():
    cfg = tiny()
    specs = {"*.in_proj": IntN(4)}
    specs.update({f"backbone.layers.{i}.mixer.in_proj": IntN(8) for i in range(cfg.n_layer)})
    r = Plan(specs=specs).resolve(cfg)
    assert {r[f"backbone.layers.{i}.mixer.in_proj"] for i in range(cfg.n_layer)} == {IntN(8)}


def test_plan_naming_a_missing_layer_is_refused():
    with pytest.raises(DfplanError, match="backbone.layers.9.mixer.in_proj"):
        Plan(specs={"backbone.layers.9.mixer.in_proj": IntN(8)}).resolve(tiny())
    with pytest.raises(DfplanError, match="mlp"):
        Plan(specs={"*.mlp.fc1": IntN(8)}).resolve(tiny())


def test_plan_with_impossible_shapes_is_refused():
    cfg = tiny()   # d_model 128, d_inner 256
    with pytest.raises(DfplanError, match="does not divide"):
        Plan(specs={"*.in_proj": IntN(4, 96)}).resolve(cfg)
    with pytest.raises(DfplanError, match="exceeds min"):
        Plan(specs={"*.out_proj": Binary("row", 129)}).resolve(cfg)
    with pytest.raises(DfplanError, match="embedding"):
        Plan(specs={"backbone.embedding": Binary()}).resolve(cfg)


def test_plan_for_another_model_is_refused():
    plan = layout_plan("dfssm", Mamba2Config.preset("small"))
    with pytest.raises(DfplanError, match="different model"):
        plan.resolve(tiny())


def test_plan_json_round_trip_and_hash(tmp_path):
    cfg = tiny()
    plan = Plan(specs={"*.in_proj": Binary("row", 8, init="zero"), "*.out_proj": IntN(4, 32, False),
                       "backbone.embedding": IntN(8)}, default=Keep("fp16"), model=model_signature(cfg),
                budget_bytes=123456, predicted_bytes=120000, predicted_kl=0.25, solver="milp",
                notes="x", provenance={"seed": 0})
    plan.to_json(tmp_path / "plan.json")
    back = Plan.from_json(tmp_path / "plan.json")
    assert back == plan and back.hash() == plan.hash()
    assert plan.with_(notes="other", provenance={}).hash() == plan.hash()
    assert plan.with_(default=Keep("bf16")).hash() != plan.hash()
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content,match", [
    ("{not json", "cannot read plan"),
    ('{"specs": {"*.in_proj": "int5"}}', r"specs\['\*.in_proj'\]"),
    ('{"specs": {}, "bogus": 1}', "unknown fields"),
    ('{"specs": [], "default": "fp16"}', "'specs' must be"),
    ('{"default": "int8"}', "default must be"),
    ('{"budget_bytes": "300MB"}', "budget_bytes"),
])
def test_plan_from_json_errors(tmp_path, content, match):
    p = tmp_path / "plan.json"
    p.write_text(content)
    with pytest.raises(DfplanError, match=match):
        Plan.from_json(p)


def test_missing_plan_file(tmp_path):
    with pytest.raises(DfplanError, match="does not exist"):
        Plan.from_json(tmp_path / "nope.json")


# -- size --------------------------------------------------------------------------------------

def test_dfssm_and_fp16_totals_for_1p3b():
    dfssm = plan_bytes(C13, layout_plan("dfssm", C13))
    assert dfssm.total_bytes == 275_578_080 <= 278_000_000
    assert plan_bytes(C13, layout_plan("fp16", C13)).total_bytes == 2_687_514_624
    parts = {}
    for c in dfssm.components:
        for role, n in c["parts"].items():
            parts[role] = parts.get(role, 0) + n
    assert parts["bits"] == 154_927_104 and parts["correction"] == 13_845_504
    assert parts["codes"] == 102_989_824 and parts["scales"] == 1_013_760 + 100_576
    assert sum(c["bytes"] for c in dfssm.components if c["kind"] == "other") == 2_701_312


@pytest.mark.parametrize("name", layout_names())
def test_report_layout_and_groups_agree(name):
    for cfg in (tiny(), HYBRID):
        plan = layout_plan(name, cfg)
        rep = plan_bytes(cfg, plan)
        lay = packed_layout(cfg, plan)
        from dfplan.formats.size import layout_bytes
        assert rep.total_bytes == layout_bytes(lay) == sum(c["bytes"] for c in rep.components)
        assert sum(g["bytes"] for g in rep.by_group()) == rep.total_bytes
        assert sum(g["params"] for g in rep.by_group()) == rep.params


def test_size_cli_json_and_table(capsys, tmp_path):
    assert cli_main(["size", "--model", "preset:mamba2-1.3b", "--layout", "dfssm", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] == 275_578_080 and isinstance(out["components"], list)
    assert cli_main(["size", "--model", "preset:mamba2-1.3b", "--layout", "fp16"]) == 0
    text = capsys.readouterr().out
    assert "2,687,514,624" in text and "2,687.51" in text
    plan = layout_plan("int4", tiny())
    plan.to_json(tmp_path / "p.json")
    assert cli_main(["size", "--model", "preset:tiny", "--plan", str(tmp_path / "p.json"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_bytes"] == plan_bytes(tiny(), plan).total_bytes


def test_size_cli_bad_plan_is_one_line_error(capsys, tmp_path):
    p = tmp_path / "p.json"
    Plan(specs={"backbone.layers.99.mixer.in_proj": IntN(8)}).to_json(p)
    assert cli_main(["size", "--model", "preset:tiny", "--plan", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "backbone.layers.99.mixer.in_proj" in err
