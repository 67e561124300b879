"""`dfplan report`: a synthetic run directory (every artifact a run can hold, written with the
real planner where it is cheap and by hand elsewhere) rendered whole, with each artifact
missing, and with bad input; figures are real PNGs with content; table rows match the files."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.plan import Plan
from dfplan.formats.size import plan_bytes
from dfplan.formats.specs import DEFAULT_CANDIDATES
from dfplan.formats.units import allowed_specs, compressible_units
from dfplan.reports import render_report
from dfplan.reports.check import check_report

CFG = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, vocab_size=512, headdim=16, d_state=16,
                                          name="synthetic")


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))


def _sensitivity(run: Path, rng) -> None:
    rows = []
    for u in compressible_units(CFG):
        weight = float(rng.lognormal(0, 1))          # how fragile this unit is
        for s in DEFAULT_CANDIDATES:
            if not allowed_specs(u)(s):
                continue
            bits = s.bits_per_weight(u.shape)
            kl = 1e-7 if s.name == "fp16" else weight * math.exp(-0.9 * bits) * float(rng.uniform(0.8, 1.2))
            rows.append({"unit": u.name, "kind": u.kind, "block": u.block, "spec": s.name,
                         "bytes": s.nbytes(u.shape), "params": u.numel, "kl": kl, "rkl": kl * 1.1,
                         "dce": kl / 2, "mse": kl * 3, "cos": 1 - kl, "sqnr": 30 - bits,
                         "n_tokens": 512, "seed": 0, "calib": "abc"})
    pd.DataFrame(rows).to_csv(run / "sensitivity.csv", index=False)
    blocks = [{"block": b, "units": 2, "spec": s, "bytes": 1000, "params": 10, "kl": float(rng.uniform(0.01, 1)),
               "rkl": 0.1, "dce": 0.1, "mse": 0.1, "cos": 0.9, "sqnr": 10, "n_tokens": 512, "seed": 0,
               "calib": "abc"} for b in range(CFG.n_layer) for s in ("bin", "int4")]
    pd.DataFrame(blocks).to_csv(run / "sensitivity_blocks.csv", index=False)
    _write(run / "sensitivity.json", {
        "format": "dfplan-sensitivity", "version": 1,
        "model": {"arg": str(run / "teacher"), "config": CFG.to_mamba_ssm_dict()},
        "calibration": {"windows": 8, "seq_len": 64, "seed": 0},
        "options": {"model": str(run / "teacher"), "corpus": ["builtin"], "windows": 8, "seq_len": 64,
                    "candidates": "default"},
        "git_commit": "0123456789abcdef", "versions": {"python": "3.11", "torch": "2.x", "dfplan": "0.1.0",
                                                       "platform": "Linux-test", "threads": 1}})
    _write(run / "validation.json", {
        "baseline": {"ppl": 100.0}, "n_rows": 12,
        "spearman": {m: {"rho": 0.5, "p": 0.01} for m in ("kl", "mse")},
        "spearman_within_spec": {m: {"mean_rho": 0.4} for m in ("kl", "mse")}})


def _search(run: Path, out: Path, budget: int, solver: str = "milp") -> Plan:
    from dfplan.planner.run import SearchOptions, search
    return search(SearchOptions(model=str(run / "teacher"), budget=budget, out=str(out),
                                sensitivity=str(run / "sensitivity.csv"), solver=solver, trials=12,
                                front_points=6, progress=False), say=lambda m: None)


def _student(run: Path, sub: str, plan: Plan, rng) -> None:
    st = run / sub / "student"
    nbytes = plan_bytes(CFG, plan).total_bytes
    plan.to_json(st / "plan.json")
    _write(st / "config.json", {"format": "dfplan-packed", "name": CFG.name, "dfplan_config": CFG.to_mamba_ssm_dict()})
    (st / "model.safetensors").write_bytes(b"\0" * 16)
    _write(st / "manifest.json", {"format": "dfplan-packed", "version": 1, "payload_bytes": nbytes,
                                  "plan_hash": plan.hash(), "model": CFG.name, "git_commit": "0123456789ab",
                                  "versions": {"torch": "2.x"},
                                  "files": {"model.safetensors": {"sha256": "0" * 64, "bytes": 16}}})
    t_ppl = 80.0
    ev = {"teacher": {"ppl": t_ppl, "nll": math.log(t_ppl), "kl_to_teacher": 0.0},
          "ptq": {"ppl": float(rng.uniform(150, 300)), "kl_to_teacher": float(rng.uniform(0.3, 1))},
          "scaffold_only": {"ppl": float(rng.uniform(300, 600)), "kl_to_teacher": float(rng.uniform(1, 2))},
          "student": {"ppl": float(rng.uniform(85, 100)), "kl_to_teacher": float(rng.uniform(0.02, 0.1))},
          "windows": 8, "seq_len": 64, "source": {"split": "valid"}}
    _write(st / "eval.json", ev)
    _write(st / "distill.json", {"teacher": str(run / "teacher"), "plan": str(run / sub / "plan.json"),
                                 "corpus": ["builtin"], "config": {"seq_len": 64}, "tokens_seen": 4096,
                                 "tokens_per_s": 1234.5, "compression": 2.5, "threads": 1, "torch": "2.x",
                                 "git_commit": "0123456789ab"})
    log = [{"step": s, "tokens": 256 * s, "loss": 2.0 / s, "kl": 1.0 / s, "ce": 5.0 - s / 10,
            "phase": "anneal" if s <= 5 else ("correct" if s <= 12 else "final")} for s in range(1, 17)]
    _write(st / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    _write(run / sub / "eval.json", {
        "model": str(st), "corpus": ["builtin-heldout"], "seq_len": 64, "ppl": float(rng.uniform(90, 110)),
        "n_windows": 8, "n_tokens": 512, "teacher_ppl": 85.0, "kl_to_teacher": float(rng.uniform(0.02, 0.2)),
        "results": {"piqa": {"acc,none": 0.55, "acc_stderr,none": 0.01, "acc_norm,none": 0.56},
                    "arc_easy": {"acc,none": 0.31, "acc_stderr,none": 0.02}},
        "teacher": {"results": {"piqa": {"acc,none": 0.6, "acc_stderr,none": 0.01}}}})


def build_run(root: Path) -> Path:
    """A complete synthetic run: teacher, sensitivity (+ validation, blocks), a main plan searched
    with MILP + TPE (study.db), a second DF-SSM-budget plan, students, evals, benchmarks, demo.json."""
    rng = np.random.default_rng(0)
    run = root / "run"
    t = run / "teacher"
    _write(t / "config.json", CFG.to_mamba_ssm_dict())
    _write(t / "zoo.json", {"preset": "tiny", "config": CFG.to_mamba_ssm_dict(), "tokens_seen": 20480,
                            "steps": 10, "val_ppl": 85.5, "unigram_ppl": 400.25, "val_windows": 8,
                            "tokens_per_s": 999.0, "threads": 1, "torch": "2.x", "git_commit": "0123456789ab"})
    _write(t / "train_log.jsonl", "".join(json.dumps({"step": s, "tokens": 2048 * s, "loss": 8 - s / 2,
                                                      "val_ppl": 500 / s, "lr": 1e-3}) + "\n" for s in range(1, 11)))
    _sensitivity(run, rng)
    fp16 = 2 * plan_bytes(CFG, Plan(specs={})).params
    main = _search(run, run, int(0.45 * fp16), solver="tpe")
    dfssm = _search(run, run / "dfssm", int(0.2 * fp16))
    _student(run, ".", main, rng)
    _student(run, "dfssm", dfssm, rng)
    kr = []
    for unit, shape in (("in_proj", (272, 64)), ("out_proj", (64, 128))):
        for impl, ms in (("bin", 0.01), ("bin+r16", 0.02), ("int8", 0.03), ("fp32", 0.2)):
            kr.append({"unit": unit, "out": shape[0], "in": shape[1], "batch": 1, "impl": impl, "device": "cpu",
                       "median_ms": ms * float(rng.uniform(1, 1.2)), "bound_ms": ms / 2, "x_bound": 2.1,
                       "speedup_vs_float": 0.2 / ms})
    _write(run / "bench" / "kernels.json", {"benchmark": "kernels", "config": {"model": "tiny", "batches": [1],
                                                                               "device": "cpu"},
                                            "bandwidth": {"read_gbs": 20.5}, "rows": kr,
                                            "metadata": {"git": {"commit": "0123456789abcdef", "dirty": False},
                                                         "versions": {"python": "3.11", "torch": "2.x"},
                                                         "cpu": {"model": "Test CPU", "torch_threads": 1,
                                                                 "loadavg_1m_5m_15m": [0.5, 0.5, 0.5]}}})
    _write(run / "bench" / "e2e.json", {"benchmark": "e2e", "rows": [
        {"variant": v, "batch": 1, "decode_tok_s": tok, "bound_tok_s": tok * 1.5, "prefill_ms": 12.5,
         "model_bytes": 1000} for v, tok in (("dfplan-packed", 300.0), ("dfplan-fp32", 80.0))],
        "skipped": [{"variant": "llama.cpp", "reason": "llama-cpp-python not installed"}]})
    def tasks(acc):
        return {"tasks": {"piqa": {"source": "piqa.jsonl", "acc": acc, "acc_stderr": 0.02, "chance": 0.5}},
                "perplexity": {"wikitext2": {"token_perplexity": 1042.5, "bits_per_byte": 3.83}}}
    _write(run / "tasks.json", {"model": tasks(0.52), "teacher": tasks(0.61)})
    for sub in (run, run / "dfssm"):
        _write(sub / "run.json", {"model": str(t), "fingerprint": "f" * 64,
                                  "commands": {"search": "2026-01-01T00:00:00+00:00"}})
    _write(run / "demo.json", {"config": {"out": str(run)}, "stages": [
        {"stage": "teacher", "status": "done", "result": "val ppl 85.50"},
        {"stage": "search", "status": "done", "result": "ok"}]})
    _probe(run / "probe", rng)
    (run / "logs").mkdir()
    (run / "logs" / "search.txt").write_text("log\n")
    return run


def _probe(out: Path, rng) -> None:
    """What `dfplan probe --compare` writes (summary, per-layer metrics, one-block swaps)."""
    phases = {"categorisation": [0, 0], "recall": [1, 1], "formatting": None, "notes": []}
    models = [{"name": n, "model": f"/x/{n}", "n_layer": CFG.n_layer, "final_top1": 0.25, "final_top10": 0.5,
               "phases": phases} for n in ("teacher", "student")]
    _write(out / "probe.json", {"prompts": {"path": "p.jsonl", "n": 40, "categories": 4}, "top_k": 10,
                                "chance": 0.25, "models": models,
                                "recall_disturbance": [{"block": 1, "logprob_drop": 0.75}],
                                "options": {"model": "/x/teacher", "prompts": "p.jsonl", "compare": "/x/student"}})
    rows = [{"model": n, "layer": layer, "category_separation": float(rng.uniform(0, 1)),
             "category_accuracy": float(rng.uniform(0.25, 1)), "top10_rate": float(rng.uniform(0, 1)),
             "median_rank": int(rng.integers(0, 50)), "phase": "-"}
            for n in ("teacher", "student") for layer in range(-1, CFG.n_layer)]
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "probe_layers.csv", index=False)
    pd.DataFrame([{"block": b, "logprob_drop": float(rng.uniform(0, 1)), "kl": 0.1}
                  for b in range(CFG.n_layer)]).to_csv(out / "probe_swap.csv", index=False)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return build_run(tmp_path_factory.mktemp("report"))


@pytest.fixture
def run_copy(full_run, tmp_path) -> Path:
    # without the report the module's full_report fixture may have rendered into full_run
    return Path(shutil.copytree(full_run, tmp_path / "run", ignore=shutil.ignore_patterns("report*")))


# -- helpers -------------------------------------------------------------------------------------

def md_tables(text: str) -> list[list[list[str]]]:
    """Every GitHub markdown table in `text` as rows of cells (header row first, rule dropped)."""
    tables, cur = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def table_with(text: str, header0: str, header1: str | None = None) -> list[list[str]]:
    for t in md_tables(text):
        if t[0][0] == header0 and (header1 is None or t[0][1] == header1):
            return t
    raise AssertionError(f"no table headed {header0!r} {header1!r}")


def png_ok(path: Path) -> None:
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), dtype=float)
    assert a.shape[0] > 100 and a.shape[1] > 100, path
    assert a.std() > 10, f"{path} looks blank (pixel std {a.std():.2f})"


# -- the full report -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_report(full_run):
    rep = render_report(full_run)
    return rep, rep.path.read_text()


def test_full_report_has_every_section_and_valid_figures(full_report, full_run):
    rep, text = full_report
    assert rep.path == full_run / "report.md"
    for heading in ("## Plans", "## Sensitivity", "## Pareto front", "## Per-layer allocation",
                    "## Size breakdown", "## Optuna search", "## Training and distillation", "## Evaluation",
                    "## Latency and throughput", "## Knowledge probe", "## Environment", "## Artifacts used"):
        assert heading in text
    assert "Not available" not in text
    names = {p.name for p in rep.figures}
    assert {"sensitivity_heatmap.png", "pareto_front.png", "allocation.png", "size_breakdown.png",
            "training_curves.png", "bench_kernels.png", "bench_e2e.png", "probe_0.png"} <= names
    assert any(n.startswith("optuna_main_") for n in names)
    for p in rep.figures:
        assert p.parent == full_run / "report_figures"
        assert f"report_figures/{p.name}" in text
        png_ok(p)
    # every figure has its reproduce block beside it
    assert text.count("![") == len(rep.figures)
    assert text.count("Reproduce:") >= len(rep.figures) - 1
    assert "dfplan report" in text and "dfplan sensitivity --model" in text


def test_report_names_every_file_it_used_and_every_artifact(full_report, full_run):
    rep, text = full_report
    used_section = text.split("## Artifacts used", 1)[1]
    for rel in rep.used:
        assert f"`{rel}`" in used_section
    assert check_report(full_run, rep.path) == []
    # every data file of the run was used (logs, tokenizers, weights and parquet twins are not data)
    for rel in ("sensitivity.csv", "sensitivity.json", "sensitivity_blocks.csv", "validation.json", "plan.json",
                "plan.md", "pareto.csv", "study.db", "dfssm/plan.json", "dfssm/pareto.csv",
                "student/manifest.json", "student/plan.json", "student/train_log.jsonl", "dfssm/student/eval.json",
                "eval.json", "dfssm/eval.json", "bench/kernels.json", "bench/e2e.json", "demo.json",
                "teacher/zoo.json", "teacher/train_log.jsonl", "teacher/config.json", "run.json", "dfssm/run.json", "tasks.json"):
        assert rel in rep.used, rel


def test_sensitivity_table_rows_match_the_csv(full_report, full_run):
    _, text = full_report
    df = pd.read_csv(full_run / "sensitivity.csv")
    t = next(t for t in md_tables(text) if t[0][0] == "unit" and "fp16" in t[0])
    head = t[0]
    assert [r[0] for r in t[1:]] == list(dict.fromkeys(df["unit"]))      # model order, every unit
    for row in t[1:]:
        for spec, cell in zip(head[1:], row[1:]):
            hit = df[(df["unit"] == row[0]) & (df["spec"] == spec)]
            assert cell == ("" if hit.empty else format(hit["kl"].iloc[0], ".3g")), (row[0], spec)
    blocks = pd.read_csv(full_run / "sensitivity_blocks.csv")
    bt = table_with(text, "block")
    for row in bt[1:]:
        for spec, cell in zip(bt[0][1:], row[1:]):
            hit = blocks[(blocks["block"] == int(row[0])) & (blocks["spec"] == spec)]
            assert cell == format(hit["kl"].iloc[0], ".3g")


def test_pareto_and_plans_tables_match_their_artifacts(full_report, full_run):
    _, text = full_report
    front = pd.read_csv(full_run / "pareto.csv")
    t = table_with(text, "bytes", "MB")
    assert len(t) - 1 == len(front)
    for row, r in zip(t[1:], front.itertuples()):
        assert row[0] == f"{int(r.bytes):,}" and row[2] == format(r.predicted_kl, ".4g")
    plans = table_with(text, "", "main")
    assert plans[0][1:] == ["main", "dfssm"]
    cells = {r[0]: r[1:] for r in plans[1:]}
    for i, sub in enumerate(("", "dfssm/")):
        p = json.loads((full_run / sub / "plan.json").read_text())
        ev = json.loads((full_run / sub / "student" / "eval.json").read_text())
        assert cells["plan bytes"][i] == f"{p['predicted_bytes']:,}"
        assert cells["predicted KL"][i] == format(p["predicted_kl"], ".4g")
        assert cells["ppl distilled"][i] == f"{ev['student']['ppl']:,.2f}"
    # the side-by-side table counts the 1-bit scaffold projections of each plan
    for i, sub in enumerate(("", "dfssm/")):
        res = Plan.from_json(full_run / sub / "plan.json").resolve(CFG)
        lin = [u for u in compressible_units(CFG) if u.kind not in ("embedding", "lm_head")]
        n = sum(res[u.name].name.startswith("bin") for u in lin)
        assert cells["1-bit scaffold projections"][i] == f"{n} of {len(lin)}"


def test_allocation_size_eval_and_bench_tables_match(full_report, full_run):
    _, text = full_report
    alloc = table_with(text, "unit", "kind")
    for i, sub in enumerate(("", "dfssm/")):
        res = Plan.from_json(full_run / sub / "plan.json").resolve(CFG)
        units = compressible_units(CFG)
        assert len(alloc) - 1 == len(units)
        for row, u in zip(alloc[1:], units):
            assert row[2 + 2 * i] == res[u.name].name
            assert row[3 + 2 * i] == f"{res[u.name].bits_per_weight(u.shape):,.3f}"
    size = table_with(text, "bytes on")
    total = size[-1]
    for i, sub in enumerate(("", "dfssm/")):
        assert total[1 + 2 * i] == f"{plan_bytes(CFG, Plan.from_json(full_run / sub / 'plan.json')).total_bytes:,}"
    ev = table_with(text, "model", "perplexity")
    got = {r[0]: r for r in ev[1:]}
    se = json.loads((full_run / "student" / "eval.json").read_text())
    assert got["teacher (fp)"][1] == f"{se['teacher']['ppl']:,.2f}"
    assert got["main: distilled student (packed)"][1] == f"{se['student']['ppl']:,.2f}"
    assert got["main: distilled student (packed)"][2] == format(se["student"]["kl_to_teacher"], ".4g")
    assert got["chance: uniform over the vocabulary"][1] == f"{CFG.vocab_size:,.2f}"
    he = json.loads((full_run / "dfssm" / "eval.json").read_text())
    assert got["dfssm: packed student, held-out"][1] == f"{he['ppl']:,.2f}"
    tasks = table_with(text, "task", "metric")
    piqa = next(r for r in tasks[1:] if r[0] == "piqa" and r[1] == "acc")
    assert piqa[2] == "0.500" and piqa[3].startswith("0.5500") and piqa[4].startswith("0.6000")
    dt = next(t for t in md_tables(text) if t[0][:3] == ["task", "metric", "chance"] and "student" in t[0])
    assert dt[0] == ["task", "metric", "chance", "student", "teacher"]
    got = {(r[0], r[1]): r for r in dt[1:]}
    assert got[("piqa", "acc")][2:] == ["0.500", "0.5200 ± 0.0200", "0.6100 ± 0.0200"]
    assert got[("wikitext2", "token_perplexity")][2:] == ["", "1,042.5000", "1,042.5000"]
    kr = json.loads((full_run / "bench" / "kernels.json").read_text())["rows"]
    kt = table_with(text, "unit", "out x in")
    assert len(kt) - 1 == len(kr)
    for row, r in zip(kt[1:], kr):
        assert row[3] == r["impl"] and row[4] == f"{r['median_ms']:,.3f}" and row[5] == f"{r['bound_ms']:,.3f}"
    e2e = table_with(text, "variant")
    assert [r[0] for r in e2e[1:]] == ["dfplan-packed", "dfplan-fp32"]
    assert "llama.cpp (llama-cpp-python not installed)" in text


def test_report_is_deterministic(full_run, tmp_path):
    a = render_report(full_run, tmp_path / "a.md").path.read_text()
    b = render_report(full_run, tmp_path / "b.md").path.read_text()
    assert a.replace("a_figures", "X").replace("a.md", "Y") == b.replace("b_figures", "X").replace("b.md", "Y")
    assert not re.search(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", a)      # no timestamps


# -- each artifact missing -----------------------------------------------------------------------

MISSING = ["tasks.json", "sensitivity.csv", "validation.json", "pareto.csv", "study.db", "student/train_log.jsonl",
           "teacher/train_log.jsonl", "student/eval.json", "eval.json", "student/manifest.json",
           "bench", "demo.json", "teacher", "dfssm", "sensitivity.json", "probe"]


@pytest.mark.parametrize("rel", MISSING)
def test_each_artifact_missing_renders_with_one_line(run_copy, rel):
    p = run_copy / rel
    shutil.rmtree(p) if p.is_dir() else p.unlink()
    rep = render_report(run_copy)
    text = rep.path.read_text()
    assert "## Artifacts used" in text
    for f in rep.figures:
        png_ok(f)
    assert not any(u == rel or u.startswith(rel + "/") for u in rep.used)
    if rel in ("dfssm", "demo.json", "sensitivity.json", "teacher", "tasks.json"):
        return      # optional context: the report simply has less in it
    lines = [ln for ln in text.splitlines() if ln.lstrip("- ").startswith(("_Not available", "main: _Not"))]
    assert lines, "no one-line 'Not available' note"
    assert rel.split("/")[-1] in "\n".join(lines)


def test_plan_missing_leaves_plan_sections_one_line(run_copy):
    for sub in ("", "dfssm/"):
        (run_copy / sub / "plan.json").unlink()
    text = render_report(run_copy).path.read_text()
    for heading in ("## Plans", "## Pareto front", "## Per-layer allocation", "## Size breakdown"):
        body = text.split(heading, 1)[1].split("\n## ", 1)[0].strip()
        assert body.startswith("_Not available: `plan.json` is missing"), heading


# -- bad input -----------------------------------------------------------------------------------

def test_not_a_run_directory(tmp_path):
    with pytest.raises(DfplanError, match="not a run directory.*expected"):
        render_report(tmp_path)
    with pytest.raises(DfplanError, match="does not exist"):
        render_report(tmp_path / "nope")
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(DfplanError, match="is a file; expected"):
        render_report(f)
    assert not (tmp_path / "report.md").exists()


def test_mixed_fingerprints_named(run_copy):
    p = run_copy / "dfssm" / "run.json"
    p.write_text(json.dumps({"model": "runs/other-teacher", "fingerprint": "e" * 64, "commands": {}}))
    with pytest.raises(DfplanError, match=r"different models.*run\.json.*dfssm/run\.json.*other-teacher"):
        render_report(run_copy)
    assert not (run_copy / "report.md").exists()


def test_mixed_models_named(run_copy):
    p = run_copy / "dfssm" / "student" / "config.json"
    d = json.loads(p.read_text())
    d["dfplan_config"]["d_model"] = 96
    p.write_text(json.dumps(d))
    (run_copy / "report.md").write_text("old report\n")
    with pytest.raises(DfplanError) as e:
        render_report(run_copy)
    msg = str(e.value)
    assert "different models" in msg and "teacher/config.json" in msg and "dfssm/student/config.json" in msg
    assert "d_model=64" in msg and "d_model=96" in msg
    assert (run_copy / "report.md").read_text() == "old report\n"      # untouched
    assert not (run_copy / "report_figures").exists()
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.parametrize("rel,content", [("plan.json", "{\"specs\": "), ("sensitivity.csv", "\0\0garbage"),
                                         ("student/eval.json", "[1, 2]"), ("bench/kernels.json", "{"),
                                         ("teacher/train_log.jsonl", "{\"step\": 1}\nnot json\n"),
                                         ("study.db", "not a database")])
def test_corrupt_artifact_is_named_and_nothing_written(run_copy, rel, content):
    (run_copy / rel).write_text(content)
    with pytest.raises(DfplanError) as e:
        render_report(run_copy)
    assert rel.split("/")[-1] in str(e.value) and "corrupt" in str(e.value)
    assert not (run_copy / "report.md").exists()
    assert not (run_copy / "report_figures").exists()


def test_cli_writes_report_and_reports_errors(full_run, tmp_path, capsys):
    from dfplan.cli import main
    out = tmp_path / "r" / "rep.md"
    assert main(["report", str(full_run), "--out", str(out)]) == 0
    assert out.is_file() and (out.parent / "rep_figures" / "pareto_front.png").is_file()
    assert f"wrote {out}" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_check_flags_an_artifact_the_report_does_not_name(run_copy):
    run = run_copy
    rep = render_report(run)
    (run / "extra.json").write_text("{}")
    assert check_report(run, rep.path) == ["extra.json"]
