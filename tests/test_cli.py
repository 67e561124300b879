"""The command line: subcommand listing, 'not implemented yet', one-line errors that leave
nothing behind, zoo list and the demo's stage runner."""
import json

import numpy as np
import pytest

from dfplan import cli
from dfplan.errors import DfplanError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / "cache"))


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "scan", "state", "token", "model"]
    p = tmp_path_factory.mktemp("c") / "t.txt"
    p.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(400)) + "\n")
    return p


def test_help_lists_subcommands(capsys):
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_unimplemented_subcommand(capsys, monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "frobnicate", "A command nobody wrote.")
    rc, out, err = run(["frobnicate", "--anything"], capsys)
    assert rc != 0 and out == ""
    assert err.strip() == "error: 'dfplan frobnicate' is not implemented yet"


def _one_error_line(rc, out, err, pattern):
    import re
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_zoo_unknown_preset(tmp_path, capsys):
    out = tmp_path / "t"
    _one_error_line(*run(["zoo", "train", "--preset", "huge", "--out", str(out)], capsys),
                    "unknown teacher preset 'huge'; choose one of: tiny, small")
    assert not out.exists()


def test_zoo_unreadable_corpus(tmp_path, capsys):
    out = tmp_path / "t"
    _one_error_line(*run(["zoo", "train", "--corpus", str(tmp_path / "nope.txt"), "--out", str(out)], capsys),
                    "corpus path .*nope.txt does not exist")
    assert not out.exists()


def test_zoo_corpus_shorter_than_window(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("just a few words here\n")
    out = tmp_path / "t"
    _one_error_line(*run(["zoo", "train", "--corpus", str(short), "--seq-len", "64", "--out", str(out)], capsys),
                    r"corpus has \d+ tokens but .* needs at least 129")
    assert not out.exists()


def test_zoo_train_and_list(tmp_path, capsys, text_file):
    out = tmp_path / "runs" / "t"
    rc, stdout, err = run(["zoo", "train", "--corpus", str(text_file), "--out", str(out), "--steps", "3",
                           "--seq-len", "16", "--batch-size", "2", "--threads", "1"], capsys)
    assert rc == 0, err
    assert "val ppl" in stdout and (out / "zoo.json").is_file()
    rc, stdout, _ = run(["zoo", "list", "--dir", str(tmp_path / "runs")], capsys)
    assert rc == 0
    assert "tiny" in stdout and "small" in stdout and str(out) in stdout
    (tmp_path / "empty").mkdir()
    rc, stdout, _ = run(["zoo", "list", "--dir", str(tmp_path / "empty")], capsys)
    assert rc == 0 and "no trained teachers" in stdout
    rc, _, err = run(["zoo", "list", "--dir", str(tmp_path / "typo")], capsys)      # a folder that is not there
    assert rc == 2 and err.startswith("error: ")


def test_demo_stage_runner(tmp_path):
    from dfplan.commands.demo import DemoConfig, Stage, run_demo
    calls = []

    def make(path, fail=False):
        def _run(c):
            calls.append(path)
            if fail:
                raise DfplanError("broken on purpose")
            (c.run / path).write_text("x")
        return _run

    def result(c):
        return "ok"

    stages = (
        Stage("a", "a.txt", None, (), make("a.txt"), result),
        Stage("b", "b.txt", "no-such-command-yet", ("a.txt",), make("b.txt"), result),
        Stage("c", "c.txt", None, ("b.txt",), make("c.txt"), result),
        Stage("d", "d.txt", None, ("a.txt",), make("d.txt", fail=True), result),
    )
    cfg = DemoConfig(out=str(tmp_path / "demo"))
    rows = {r["stage"]: r for r in run_demo(cfg, stages)}
    assert rows["a"]["status"] == "done" and rows["a"]["result"] == "ok"
    assert rows["b"]["status"] == "not implemented yet"
    assert rows["c"]["status"] == "skipped (needs b.txt)"
    assert rows["d"]["status"] == "failed: broken on purpose" and rows["d"]["result"] == ""
    assert calls == ["a.txt", "d.txt"]
    # a rerun skips the finished stage and records the table
    rows = {r["stage"]: r for r in run_demo(cfg, stages)}
    assert rows["a"]["status"] == "cached" and calls == ["a.txt", "d.txt", "d.txt"]
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert [r["stage"] for r in saved["stages"]] == ["a", "b", "c", "d"]


def test_demo_command_teacher_stage(tmp_path, capsys, monkeypatch, text_file):
    import dfplan.commands.demo as demo
    # only the teacher stage: the later stages have their own tests and take minutes
    monkeypatch.setattr(demo, "STAGES", demo.STAGES[:1])
    monkeypatch.chdir(tmp_path)             # the demo writes ./dfplan.toml
    monkeypatch.delenv("DFPLAN_PROJECT")
    argv = ["demo", "--out", str(tmp_path / "demo"), "--corpus", str(text_file), "--teacher-steps", "2",
            "--seq-len", "16", "--threads", "1"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "teacher" in out and "done" in out and "val ppl" in out
    assert (tmp_path / "demo" / "teacher" / "zoo.json").is_file()
    assert 'model = "' in (tmp_path / "dfplan.toml").read_text()
    rc, out, _ = run(argv, capsys)
    assert rc == 0 and "cached" in out
