"""The SSM state precision as a plan axis: schema round trip, `search --state-dtype auto`,
packed artifacts decoding with their plan's state precision, and bad values."""
import json

import pytest
import torch

import dfplan
from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.layouts import layout_plan
from dfplan.formats.plan import Plan
from dfplan.formats.size import plan_bytes
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import train_bpe

CFG = Mamba2Config.preset("tiny").replace(chunk_size=16, vocab_size=320, d_model=64, n_layer=2,
                                          headdim=16, d_state=16, name="t")
TEXT = "hello world, the quick brown fox jumps over the lazy dog. " * 40


def _ssm_bytes(cfg, nbytes):      # state (B=1): layers x heads x headdim x d_state, read + written
    return 2 * cfg.n_layer * (cfg.d_model * cfg.expand // cfg.headdim) * cfg.headdim * cfg.d_state * nbytes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    save_mamba_ssm(build_model(CFG, seed=0).eval(), d, tokenizer=train_bpe([TEXT], 300))
    return d


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- schema ------------------------------------------------------------------------------------
def test_plan_round_trips_with_and_without_the_state_fields(tmp_path):
    base = layout_plan("int8", CFG)
    d = base.to_dict()
    assert "state_dtype" not in d                       # an fp32 plan is written as before
    old = Plan.from_dict(d)
    assert old.state_dtype == "fp32" and old.state_kl is None and old.state_bytes_per_token is None
    assert old == base
    low = base.with_(state_dtype="bf16", state_kl=2.8e-4, state_bytes_per_token=12_288)
    low.to_json(tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    assert (raw["state_dtype"], raw["state_kl"], raw["state_bytes_per_token"]) == ("bf16", 2.8e-4, 12_288)
    back = Plan.from_json(tmp_path / "plan.json")
    assert back == low and back.to_dict() == low.to_dict()
    assert back.hash() == base.hash()                   # no weight changes: same artifact identity


@pytest.mark.parametrize("field, value, msg", [
    ("state_dtype", "fp8", "state_dtype 'fp8' is not one of fp32, bf16, fp16"),
    ("state_dtype", 16, "wrong type"),
    ("state_kl", "small", "'state_kl' has the wrong type"),
    ("state_bytes_per_token", 1.5, "'state_bytes_per_token' has the wrong type"),
])
def test_bad_state_fields_in_a_plan_file(tmp_path, capsys, field, value, msg):
    d = layout_plan("int8", Mamba2Config.preset("tiny")).to_dict()
    d[field] = value
    with pytest.raises(DfplanError, match=msg):
        Plan.from_dict(d)
    (tmp_path / "p.json").write_text(json.dumps(d))
    rc, out, err = run(capsys, "size", "--model", "preset:tiny", "--plan", str(tmp_path / "p.json"))
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


# -- search ------------------------------------------------------------------------------------
def _budget():
    return str(plan_bytes(CFG, layout_plan("int8", CFG)).total_bytes)


def test_search_state_dtype_auto_measures_and_records(ckpt, tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "--model", str(ckpt), "--prior", "--budget", _budget(), "--out", str(out),
                     "--state-dtype", "auto", "--state-tokens", "24", "--corpus", str(tmp_path / "c.txt"))
    assert rc == 0, err
    plan = Plan.from_json(out / "plan.json")
    st = plan.provenance["state"]
    assert st["requested"] == "auto" and st["tokens"] == 24 and st["prompt"] == [str(tmp_path / "c.txt")]
    kls = st["kl"]
    assert set(kls) == {"bf16", "fp16"}
    for r in kls.values():
        assert r["tokens"] == 24 and r["kl_mean"] >= 0 and r["kl_max"] >= r["kl_mean"]
    assert kls["bf16"]["kl_mean"] > 0                        # bf16 keeps ~3 digits: never exact here
    ok = [d for d in kls if kls[d]["kl_mean"] <= st["kl_max"]]
    assert plan.state_dtype in (ok or ["fp32"])
    want = {"fp32": 4, "bf16": 2, "fp16": 2}[plan.state_dtype]
    assert plan.state_bytes_per_token == _ssm_bytes(CFG, want) == st["bytes_per_token"][plan.state_dtype]
    if plan.state_dtype != "fp32":
        assert plan.state_kl == kls[plan.state_dtype]["kl_mean"]
    md = (out / "plan.md").read_text()
    assert "## SSM state precision" in md and f"{kls['bf16']['kl_mean']:.3g}" in md
    assert "state bf16: mean KL" in err and "state precision:" in err


def test_search_auto_with_no_headroom_keeps_fp32(ckpt, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "--model", str(ckpt), "--prior", "--budget", _budget(), "--out", str(out),
                     "--state-dtype", "auto", "--state-tokens", "16", "--state-kl-max", "0")
    assert rc == 0, err
    plan = Plan.from_json(out / "plan.json")
    assert "seeded random token ids" in err and plan.provenance["state"]["prompt"] == "random ids"
    kls = plan.provenance["state"]["kl"]
    if all(r["kl_mean"] > 0 for r in kls.values()):
        assert plan.state_dtype == "fp32" and plan.state_kl == 0.0
        assert plan.state_bytes_per_token == _ssm_bytes(CFG, 4)


def test_search_fixed_state_dtype_needs_no_weights(tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "--model", "preset:tiny", "--random-init", "--budget", "1MB",
                     "--out", str(out), "--state-dtype", "fp16")
    assert rc == 0, err
    plan = Plan.from_json(out / "plan.json")
    cfg = Mamba2Config.preset("tiny")
    assert plan.state_dtype == "fp16" and plan.state_kl is None
    assert plan.state_bytes_per_token == _ssm_bytes(cfg, 2)
    # the default is the old behaviour: fp32, and nothing new in plan.json's weights part
    rc, _, err = run(capsys, "search", "--model", "preset:tiny", "--random-init", "--budget", "1MB",
                     "--out", str(tmp_path / "run2"))
    assert rc == 0, err
    p2 = Plan.from_json(tmp_path / "run2" / "plan.json")
    assert p2.state_dtype == "fp32" and p2.hash() == plan.hash()


@pytest.mark.parametrize("argv", [["--state-dtype", "fp8"], ["--state-kl-max", "-1"], ["--state-tokens", "1"]])
def test_search_bad_state_options_one_line_exit_2(tmp_path, capsys, argv):
    out = tmp_path / "run"
    rc, _, err = run(capsys, "search", "--model", "preset:tiny", "--random-init", "--budget", "1MB",
                     "--out", str(out), *argv)
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not out.exists()


# -- packed artifacts --------------------------------------------------------------------------
def _record_state_dtypes(m):
    seen = []
    orig = m.module.new_cache

    def new_cache(*a, **kw):
        seen.append(kw.get("state_dtype"))
        return orig(*a, **kw)
    m.module.new_cache = new_cache
    return seen


def test_packed_artifact_decodes_with_its_plans_state(ckpt, tmp_path, capsys):
    plan = layout_plan("int8", CFG).with_(state_dtype="bf16", state_kl=1e-4,
                                          state_bytes_per_token=_ssm_bytes(CFG, 2))
    plan.to_json(tmp_path / "plan.json")
    out = tmp_path / "packed"
    rc, _, err = run(capsys, "pack", "--model", str(ckpt), "--plan", str(tmp_path / "plan.json"), "--out", str(out))
    assert rc == 0, err
    assert Plan.from_json(out / "plan.json").state_dtype == "bf16"      # carried into the artifact

    m = dfplan.load(out)
    assert m.state_dtype == torch.bfloat16 and m.state_dtype_origin == "plan"
    seen = _record_state_dtypes(m)
    ids = torch.randint(0, CFG.vocab_size, (1, 7), generator=torch.Generator().manual_seed(3))
    got = m.generate(ids, 6, eos=False)
    assert seen == [torch.bfloat16]
    ref = dfplan.load(out, state_dtype="bf16")
    assert torch.equal(got, ref.generate(ids, 6, eos=False))

    over = dfplan.load(out, state_dtype="fp32")                          # an explicit choice wins
    assert over.state_dtype == torch.float32 and over.state_dtype_origin == "argument"
    seen = _record_state_dtypes(over)
    over.generate(ids, 3, eos=False)
    assert seen == [torch.float32]
    assert dfplan.load(ckpt).state_dtype == torch.float32                # no plan: fp32

    rc, _, err = run(capsys, "generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "3",
                     "--no-eos", "--stats")
    assert rc == 0 and "SSM state bf16 (plan)" in err
    assert json.loads(err.strip().splitlines()[-1])["state_dtype"] == "bf16"
    rc, _, err = run(capsys, "generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "3",
                     "--no-eos", "--stats", "--state-dtype", "fp16")
    assert rc == 0 and "SSM state fp16 (argument)" in err

    rc, text, err = run(capsys, "size", "--model", str(out), "--json")
    assert rc == 0, err
    st = json.loads(text)["decode_state"]
    assert st["state_dtype"] == "bf16" and st["ssm_state_rw"] == _ssm_bytes(CFG, 2)


def test_save_packed_keeps_the_state_dtype(tmp_path):
    m = dfplan.load("preset:tiny")
    dfplan.compress(m, layout_plan("int8", m.config).with_(state_dtype="fp16"))
    dfplan.save_packed(m, tmp_path / "p")
    assert dfplan.load(tmp_path / "p").state_dtype == torch.float16


def test_generate_bad_state_dtype_one_line(ckpt, capsys):
    rc, _, err = run(capsys, "generate", "--model", str(ckpt), "--prompt", "hi", "--state-dtype", "fp8")
    assert rc == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(DfplanError, match="state dtype 'fp8'"):
        dfplan.load(ckpt, state_dtype="fp8")
