"""bench e2e / compare / nightly: result schema, regression statistics, the nightly rule,
a tiny end-to-end run on CPU, skipped peers and bad input."""
import copy
import json
import random

import pytest
import torch

from dfplan.bench import compare as cmp
from dfplan.bench import nightly, schema
from dfplan.bench.e2e import E2EConfig, run_e2e
from dfplan.bench.variants import VARIANTS, unavailable
from dfplan.cli import main
from dfplan.errors import DfplanError
from dfplan.loading import load_config


def _result(scale=1.0, rng=None, n=15, model_bytes=1_000_000, rss=4_000_000_000):
    """A synthetic e2e result: timings drawn from lognormal noise (5% per sample) around scale x 10 ms."""
    rng = rng or random.Random(0)
    res = schema.new_result("e2e", {"model": "preset:tiny", "prompt_len": 16, "gen_len": 4,
                                    "device": "cpu", "threads": 1, "seed": 0})
    for name, base in (("dfplan-fp32", 10.0), ("hf-fp32", 30.0)):
        draw = [scale * base * rng.lognormvariate(0, 0.05) for _ in range(n)]
        pre = [scale * 4 * base * rng.lognormvariate(0, 0.05) for _ in range(n)]
        res["variants"][name] = {
            "status": "ok", "model_bytes": model_bytes, "peak_rss_bytes": rss + 500_000_000,
            "peak_rss_over_base_bytes": rss,
            "cases": {"b1": {"batch": 1, "status": "ok",
                             "metrics": {"decode_ms_per_token": schema.metric(draw),
                                         "prefill_ms": schema.metric(pre)}}}}
    res["variants"]["llamacpp-q8_0"] = {"status": "skipped", "reason": "not built"}
    res["load"] = {"start": [0.2, 0.2, 0.2], "max_1m": 0.3}     # an idle machine
    return res


# schema ----------------------------------------------------------------------------------------
def test_schema_round_trips(tmp_path):
    res = _result()
    path = schema.save(res, tmp_path / "r.json")
    back = schema.load(path)
    assert {k: v for k, v in back.items() if k != "digest"} == json.loads(json.dumps(res))
    assert back["git"]["commit"] and "dirty" in back["git"]
    m = back["machine"]
    assert m["cpu_model"] and m["logical_cpus"] >= 1 and m["ram_bytes"] > 0
    assert back["versions"]["torch"] == torch.__version__
    schema.save(back, tmp_path / "again.json")          # a loaded result saves identically
    assert schema.load(tmp_path / "again.json") == back


def test_truncated_and_edited_files_are_refused(tmp_path):
    path = schema.save(_result(), tmp_path / "r.json")
    text = path.read_text()
    (tmp_path / "trunc.json").write_text(text[: len(text) // 2])
    with pytest.raises(DfplanError, match="truncated"):
        schema.load(tmp_path / "trunc.json")
    edited = json.loads(text)
    edited["variants"]["dfplan-fp32"]["cases"]["b1"]["metrics"]["decode_ms_per_token"]["median"] = 1.0
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    with pytest.raises(DfplanError, match="digest"):
        schema.load(tmp_path / "edited.json")
    # through the CLI: one error line, exit 2
    assert main(["bench", "compare", str(path), str(tmp_path / "trunc.json")]) == 2


# compare -----------------------------------------------------------------------------------------
def test_compare_flags_a_30pct_slowdown_and_not_same_noise():
    rng = random.Random(1)
    base = _result(rng=rng)
    # two runs drawn from the same noise: no false alarm over many independent pairs
    false = sum(bool(cmp.compare(_result(rng=rng), _result(rng=rng)).regressions) for _ in range(20))
    assert false == 0
    c = cmp.compare(base, _result(scale=1.3, rng=rng))
    flagged = {(r.variant, r.metric) for r in c.regressions}
    assert ("dfplan-fp32", "decode_ms_per_token") in flagged and ("hf-fp32", "prefill_ms") in flagged
    r = next(r for r in c.rows if r.variant == "dfplan-fp32" and r.metric == "decode_ms_per_token")
    assert 1.15 < r.ratio < 1.45 and r.p_value < 0.01
    # 5% slower is below the 10% threshold even though it may be significant
    assert not cmp.compare(base, _result(scale=1.05, rng=rng)).regressions


def test_busy_machine_timings_are_shown_not_judged():
    rng = random.Random(5)
    base, slow = _result(rng=rng), _result(scale=1.3, rng=rng, model_bytes=1_050_000)
    slow["load"]["max_1m"] = 4.0 * slow["machine"]["logical_cpus"]
    c = cmp.compare(base, slow)
    assert {r.metric for r in c.regressions} == {"model_bytes"}     # sizes are still judged
    assert any("busy machine" in n for n in c.notes)
    assert any("not judged" in r.note for r in c.rows)
    assert {r.metric for r in cmp.compare(base, slow, allow_busy=True).regressions} >= {
        "model_bytes", "decode_ms_per_token"}


def test_compare_sizes_and_cli_exit_code(tmp_path):
    rng = random.Random(2)
    base = _result(rng=rng)
    bigger = _result(rng=rng, model_bytes=1_030_000)
    assert {r.metric for r in cmp.compare(base, bigger).regressions} == {"model_bytes"}
    assert not cmp.compare(base, _result(rng=rng, model_bytes=1_010_000, rss=4_040_000_000)).regressions
    # a small model's memory moving by a few MB is noise even when it is > 2%
    small = _result(rng=rng, rss=100_000_000)
    assert not cmp.compare(small, _result(rng=rng, rss=110_000_000)).regressions
    assert cmp.compare(small, _result(rng=rng, rss=130_000_000)).regressions
    schema.save(base, tmp_path / "a.json")
    schema.save(_result(rng=rng, rss=4_200_000_000), tmp_path / "b.json")
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0


def test_compare_refuses_other_machines_versions_and_parameters():
    base = _result()
    other = copy.deepcopy(base)
    other["machine"]["cpu_model"] = "Some Other CPU"
    with pytest.raises(DfplanError, match="different machines.*Some Other CPU"):
        cmp.compare(base, other)
    other = copy.deepcopy(base)
    other["bench_version"] += 1
    with pytest.raises(DfplanError, match="benchmark version"):
        cmp.compare(base, other)
    other = copy.deepcopy(base)
    other["params"]["gen_len"] = 99
    with pytest.raises(DfplanError, match="different parameters"):
        cmp.compare(base, other)


# nightly -----------------------------------------------------------------------------------------
def test_nightly_needs_two_consecutive_violations():
    rng = random.Random(3)
    ok, slow = (lambda: _result(rng=rng)), (lambda: _result(scale=1.3, rng=rng))
    flags, notes = nightly.consecutive_flags([ok(), slow(), slow()])
    assert ("dfplan-fp32", "b1", "decode_ms_per_token") in flags
    assert nightly.consecutive_flags([ok(), slow(), ok()])[0] == set()       # one noisy night
    flags, notes = nightly.consecutive_flags([ok(), ok(), slow()])           # first violation
    assert flags == set() and any("violating once" in n for n in notes)
    assert nightly.consecutive_flags([ok(), slow()])[0] == set()             # too short a history
    moved = slow()
    moved["machine"]["cpu_model"] = "elsewhere"
    flags, notes = nightly.consecutive_flags([ok(), slow(), moved])
    assert flags == set() and any("baseline reset" in n for n in notes)


def test_nightly_step_appends_and_summarises(tmp_path):
    rng = random.Random(4)
    for scale in (1.0, 1.3, 1.3):
        rep = nightly.nightly_step(tmp_path, {"e2e-tiny": _result(scale=scale, rng=rng)})
    assert len(nightly.history_runs(tmp_path)) == 3
    assert "dfplan-fp32/b1/decode_ms_per_token" in rep["flagged"]["e2e-tiny"]
    summary = (tmp_path / "summary.md").read_text()
    assert "Regressions" in summary and "dfplan-fp32" in summary and "trend.png" in summary
    assert (tmp_path / "trend.png").stat().st_size > 1000


# a real run on a tiny model --------------------------------------------------------------------
# (tiny_dir: tests/conftest.py)

def test_tiny_e2e_runs_end_to_end_on_cpu(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_PEERS_DIR", str(tmp_path / "no-peers"))
    threads = torch.get_num_threads()
    out = tmp_path / "e2e.json"
    rc = main(["bench", "e2e", "--model", str(tiny_dir), "--variants",
               "dfplan-fp32,dfplan-packed,dfplan-packed-state-bf16,hf-fp32,llamacpp-q4_0,mamba-ssm-cg",
               "--prompt-len", "16", "--gen", "4", "--batch", "1,2", "--min-samples", "10",
               "--min-time", "0", "--warmup", "1", "--no-isolate", "--threads", "1",
               "--bandwidth-mib", "16", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    torch.set_num_threads(threads)
    assert rc == 0
    res = schema.load(out)
    v = res["variants"]
    # missing optional peers are skipped with a reason, never an error
    assert v["llamacpp-q4_0"]["status"] == "skipped" and "llama.cpp" in v["llamacpp-q4_0"]["reason"]
    assert v["mamba-ssm-cg"]["status"] == "skipped" and "cuda" in v["mamba-ssm-cg"]["reason"]
    for name in ("dfplan-fp32", "dfplan-packed", "dfplan-packed-state-bf16", "hf-fp32"):
        assert v[name]["status"] == "ok", v[name]
        for b in (1, 2):
            c = v[name]["cases"][f"b{b}"]
            d = c["metrics"]["decode_ms_per_token"]
            assert d["n"] >= 10 and len(d["samples"]) == d["n"] and d["p10"] <= d["median"] <= d["p90"]
            assert c["decode_tok_s"] == pytest.approx(b * 1e3 / d["median"])
            assert c["frac_bandwidth_bound"] == pytest.approx(c["bound_ms_per_token"] / d["median"])
            # the bound counts the weights once and each sequence's state read and written
            bw = res["bandwidth"]["read_gbs"] * 1e9
            assert c["weights_bound_ms_per_token"] == pytest.approx(v[name]["model_bytes"] / bw * 1e3)
            assert c["bound_ms_per_token"] == pytest.approx(
                (v[name]["model_bytes"] + b * v[name]["state_rw_bytes"]) / bw * 1e3)
    assert v["dfplan-fp32"]["model_bytes"] == v["hf-fp32"]["model_bytes"]   # same fp32 weights
    # fp32 state: 2 x (ssm + conv) x 4 bytes; the bf16-state variant moves half the ssm bytes
    cfg = load_config(str(tiny_dir))
    ssm = cfg.n_layer * cfg.nheads * cfg.headdim * cfg.d_state
    conv = cfg.n_layer * cfg.conv_dim * cfg.d_conv
    assert v["dfplan-packed"]["state_rw_bytes"] == v["hf-fp32"]["state_rw_bytes"] == 8 * (ssm + conv)
    assert v["dfplan-packed-state-bf16"]["state_rw_bytes"] == 4 * ssm + 8 * conv
    assert v["dfplan-packed-state-bf16"]["state_dtype"] == "bf16" and v["dfplan-packed"]["state_dtype"] == "fp32"
    assert v["dfplan-packed"]["model_bytes"] < v["dfplan-fp32"]["model_bytes"] / 2
    assert res["machine"]["cpu_model"] and res["params"]["prompt_len"] == 16


def test_unknown_variant_lists_the_known_ones(tmp_path, capsys):
    assert main(["bench", "e2e", "--variants", "dfplan-fp32,turbo", "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "turbo" in err and all(n in err for n in VARIANTS)
    assert not (tmp_path / "x.json").exists()


def test_model_too_big_is_refused_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(schema, "available_ram", lambda: 2 << 30)
    cfg = E2EConfig(model="preset:mamba2-1.3b", random_init=True, variants=("dfplan-fp32", "dfplan-packed"),
                    cache_dir=str(tmp_path / "cache"), progress=False)
    with pytest.raises(DfplanError, match=r"need about .* GiB .* free"):
        run_e2e(cfg, log=lambda m: None)
    assert not (tmp_path / "cache").exists()     # nothing was built


def test_missing_peer_is_skipped_with_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_PEERS_DIR", str(tmp_path / "none"))
    why = unavailable(VARIANTS["llamacpp-tq1_0"], "cpu")
    assert why and "make peers" in why
    assert "cpu" in unavailable(VARIANTS["mamba-ssm-nocg"], "cpu")
    assert unavailable(VARIANTS["dfplan-fp32"], "cpu") is None
    from dfplan.config import Mamba2Config
    why = unavailable(VARIANTS["llamacpp-tq1_0-all"], "cpu", Mamba2Config.preset("tiny"))
    assert "256" in why and "d_model=128" in why


@pytest.mark.slow
def test_isolated_workers_measure_peak_memory_per_variant(tiny_dir, tmp_path):
    # spawned workers import torch afresh: tens of seconds on a busy 2-core machine
    cfg = E2EConfig(model=str(tiny_dir), random_init=False, variants=("dfplan-fp32", "dfplan-packed"),
                    prompt_len=8, gen_len=2, min_samples=3, min_time_s=0, threads=1, bandwidth_mib=16,
                    cache_dir=str(tmp_path / "cache"), isolate=True, progress=False)
    res = run_e2e(cfg, log=lambda m: None)
    for name in cfg.variants:
        v = res["variants"][name]
        assert v["status"] == "ok", v
        assert v["peak_rss_bytes"] >= v["base_rss_bytes"] > 0
        assert v["peak_rss_bytes"] - v["base_rss_bytes"] == v["peak_rss_over_base_bytes"]


def test_lite_variant_runs_without_torch_and_in_process(tiny_dir, tmp_path):
    """dfplan-lite: isolated, a worker process that never imports torch (its base RSS is far
    below a torch worker's); --no-isolate, the same loop in this process."""
    from dfplan.lite import native
    try:
        native.library()
    except DfplanError as e:
        pytest.skip(f"lite library not buildable here: {e}")
    base = dict(model=str(tiny_dir), random_init=False, prompt_len=8, gen_len=2, min_samples=2,
                min_time_s=0, threads=1, bandwidth_mib=16, cache_dir=str(tmp_path / "cache"), progress=False)
    res = run_e2e(E2EConfig(variants=("dfplan-packed", "dfplan-lite", "dfplan-lite-state-bf16"),
                            isolate=True, **base), log=lambda m: None)
    v = res["variants"]
    for name in ("dfplan-lite", "dfplan-lite-state-bf16"):
        assert v[name]["status"] == "ok", v[name]
        assert v[name]["runtime"] == "lite" and v[name]["cases"]["b1"]
        assert 0 < v[name]["base_rss_bytes"] < v["dfplan-packed"]["base_rss_bytes"] / 2
    assert v["dfplan-lite-state-bf16"]["state_dtype"] == "bf16"
    assert v["dfplan-lite-state-bf16"]["state_rw_bytes"] < v["dfplan-lite"]["state_rw_bytes"]
    res = run_e2e(E2EConfig(variants=("dfplan-lite",), isolate=False, **base), log=lambda m: None)
    assert res["variants"]["dfplan-lite"]["status"] == "ok"


@pytest.mark.slow
def test_worker_peak_rss_is_not_the_parents():
    # Linux keeps getrusage's ru_maxrss across fork + exec: a worker spawned after the parent
    # peaked would report the parent's peak. The worker's own peak must stay far below it.
    import multiprocessing as mp

    from dfplan.bench.e2e import _peak_rss
    big = b"\x01" * (1 << 30)                      # the parent touches 1 GiB
    parent = _peak_rss()
    with mp.get_context("spawn").Pool(1) as pool:
        child = pool.apply(_peak_rss)
    del big
    assert parent > 1 << 30 and child < parent - (512 << 20)


def test_dfplan_runner_times_the_runtime_step(tiny_dir):
    """The bench decodes through what `dfplan generate` uses (LeanStep on CPU, the state
    precision asked for), not a slower or faster private loop."""
    from dfplan.bench.variants import DfplanRunner, Prepared
    from dfplan.runtime.leanstep import LeanStep, lean_ok
    r = DfplanRunner(Prepared("dfplan", str(tiny_dir), "cpu", 1, "fp32", {"state_dtype": "bf16"}))
    cache, step = r._cache(1)
    assert lean_ok(r.module) and isinstance(step, LeanStep)
    assert cache.layers[0]["ssm"].dtype == torch.bfloat16


def test_lite_worker_reports_a_bad_artifact(tmp_path):
    from dfplan.bench.e2e import _LiteProcess
    from dfplan.bench.variants import Prepared
    from dfplan.config import Mamba2Config
    with pytest.raises(DfplanError, match="does not exist"):
        _LiteProcess(Prepared("lite", str(tmp_path / "nothing"), "cpu", 1, "packed", {}),
                     Mamba2Config.preset("tiny"))
