"""Run folders belong to one model; paths and values are checked before torch is imported;
dfplan.toml gives `dfplan search --budget ...` its model and run folder."""
import json
import os
import subprocess
import sys
import time

import pytest

from dfplan.cli import main
from dfplan.errors import DfplanError
from dfplan.project import load_project
from dfplan.runfolder import check_out_dir, check_same_model, claim_run, model_fingerprint, read_run, record_run


def _model(tmp_path, name, weights=b"w" * 1000):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"d_model": 32}))
    (d / "model.safetensors").write_bytes(weights)
    return d


def _one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_fingerprint_follows_the_weights(tmp_path):
    a = _model(tmp_path, "a")
    b = _model(tmp_path, "b", weights=b"w" * 999 + b"x")
    assert model_fingerprint(str(a)) == model_fingerprint(str(a))
    assert model_fingerprint(str(a)) != model_fingerprint(str(b))
    assert model_fingerprint("preset:tiny") != model_fingerprint("preset:small")


def test_a_run_folder_refuses_another_model(tmp_path):
    a, b = _model(tmp_path, "a"), _model(tmp_path, "b", weights=b"v" * 1000)
    run = tmp_path / "run"
    record_run(claim_run(run, str(a), command="search"), "search")
    assert read_run(run)["model"] == str(a)
    claim_run(run, str(a))                                  # the same model: fine
    with pytest.raises(DfplanError) as e:
        claim_run(run, str(b))
    assert str(a) in str(e.value) and str(b) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DfplanError):
        check_same_model(run, str(b))                       # distill under the run folder
    record_run(claim_run(run, str(b), force=True), "search")
    assert read_run(run)["model"] == str(b)


def test_foreign_non_empty_folder_needs_force(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    with pytest.raises(DfplanError, match="--force"):
        claim_run(run, "preset:tiny")
    claim_run(run, "preset:tiny", force=True)
    (run / "notes.txt").unlink()
    (run / "plan.json").write_text("{}")                    # dfplan's own output is fine
    claim_run(run, "preset:tiny")


@pytest.mark.parametrize("where", ["proc", "under_file", "readonly"])
def test_unwritable_out_is_refused(tmp_path, where):
    if where == "proc":
        path = "/proc/dfplan-out"
    elif where == "under_file":
        (tmp_path / "f").write_text("x")
        path = tmp_path / "f" / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            # root writes anyway on most file systems: the probe must then succeed, not lie
            check_out_dir(ro / "out")
            return
        path = ro / "out"
    with pytest.raises(DfplanError, match="not a writable folder"):
        check_out_dir(path)
    assert not list(tmp_path.glob("**/.dfplan-probe-*"))


def test_bad_input_fails_before_torch_is_imported(tmp_path):
    """Each case in a fresh interpreter: exit 2, one error line, torch never imported."""
    (tmp_path / "f").write_text("x")
    cases = [
        ["search", "--model", "preset:tiny", "--random-init", "--budget", "1MB", "--out", "/proc/x"],
        ["search", "--model", "preset:tiny", "--random-init", "--budget", "lots", "--out", str(tmp_path / "r")],
        ["sensitivity", "--model", "preset:tiny", "--corpus", "builtin", "--out", str(tmp_path / "f" / "s.csv")],
        ["distill", "--teacher", "preset:tiny", "--plan", "layout:dfssm", "--corpus", "builtin",
         "--tokens", "many", "--out", str(tmp_path / "s")],
        ["zoo", "train", "--out", "/proc/t"],
        ["demo", "--budget", "0%", "--out", str(tmp_path / "d")],
    ]
    code = ("import sys, time; t = time.perf_counter(); from dfplan.cli import main; "
            "rc = main(sys.argv[1:]); print(rc, 'torch' in sys.modules, round(time.perf_counter() - t, 3))")
    for args in cases:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        rc, torch_loaded, took = r.stdout.split()
        err = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert rc == "2" and len(err) == 1 and err[0].startswith("error: "), (args, r.stderr)
        assert torch_loaded == "False", args
        assert float(took) < 1.0 or time.perf_counter() - t0 < 5, (args, took)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_project_file_gives_search_its_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DFPLAN_PROJECT")
    assert main(["search", "--budget", "300MB"]) == 2
    assert "dfplan init" in _one_error(capsys)
    assert main(["init", "--model", "preset:tiny", "--corpus", "builtin", "--run", "runs/r1"]) == 0
    proj = load_project()
    assert proj["model"] == "preset:tiny" and proj["corpus"] == ["builtin"] and proj["run"] == "runs/r1"
    capsys.readouterr()
    assert main(["search", "--budget", "300kB", "--random-init"]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "runs" / "r1" / "plan.json").read_text())
    assert plan["predicted_bytes"] <= 300_000
    assert read_run(tmp_path / "runs" / "r1")["model"] == "preset:tiny"
    # an option overrides the file; another model in the same run folder is refused
    assert main(["search", "--budget", "300kB", "--random-init", "--model", "preset:small"]) == 2
    err = _one_error(capsys)
    assert "preset:tiny" in err and "preset:small" in err
    assert main(["init", "--model", "preset:tiny", "--corpus", "builtin"]) == 2     # exists: needs --force
    assert "--force" in _one_error(capsys)
    (tmp_path / "dfplan.toml").write_text("model = 3\n")
    assert main(["search", "--budget", "300kB"]) == 2
    assert "must be a string" in _one_error(capsys)


def test_result_outputs_refuse_files_dfplan_did_not_write(tmp_path, capsys):
    """bench folders and eval / e2e result files: a user's file is never overwritten or mixed in
    without --force; an earlier JSON result may be replaced."""
    from dfplan.cli import main

    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine\n")
    for argv in (["bench", "kernels", "--out", str(folder)], ["bench", "planner", "--model", "preset:tiny",
                 "--sensitivity", str(folder / "notes.txt"), "--corpus", "builtin", "--out", str(folder)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "notes.txt" in err[0] and "--force" in err[0]
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    for argv in (["eval", "--model", "preset:tiny", "--corpus", "builtin", "--out", str(notes)],
                 ["bench", "e2e", "--variants", "dfplan-fp32", "--out", str(notes)]):
        assert main(argv) == 2
        assert "not a dfplan result" in capsys.readouterr().err
        assert notes.read_text() == "mine\n"
    from dfplan.runfolder import check_result_dir, check_result_file
    (folder / "old.json").write_text("{}")
    (folder / "notes.txt").unlink()
    assert check_result_dir(folder, {"kernels.json"}) == folder          # earlier JSON results are ours
    assert check_result_file(folder / "old.json") == folder / "old.json"
