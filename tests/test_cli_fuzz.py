"""Every subcommand, every option given an empty, negative, huge, wrong-type and path-to-nowhere
value: exit 2, exactly one `error:` line, no traceback, no file left behind.

Runs in-process through dfplan.cli.main. The heavy library call behind each command is
replaced by one that raises a user error ("reached the work"), so a value the CLI accepts
ends there instead of training for minutes; every other value must be refused before it.
The base invocation of each command is valid apart from its model folder, which has no
config.json, so an unpatched command also stops with one error line.
"""
import importlib
import os

import click
import pytest

from dfplan.cli import SUBCOMMANDS, cli, main
from dfplan.errors import DfplanError

BAD = {"empty": "", "negative": "-1", "huge": "9" * 40, "wrong-type": "abc",
       "nowhere": "/nonexistent/dir/x"}

# library entry points each command calls after parsing (patched to stop there)
WORK = [("dfplan.planner.run", "search"), ("dfplan.sensitivity.run", "run_sensitivity"),
        ("dfplan.sensitivity.validate", "run_validation"), ("dfplan.distill.run", "run_distill"),
        ("dfplan.zoo", "train_teacher"), ("dfplan.evaluate", "evaluate_model"),
        ("dfplan.commands.demo", "run_demo"), ("dfplan.bench.kernels", "run_kernel_bench"),
        ("dfplan.bench.decode", "run_decode_bench"),
        ("dfplan.commands.init", "write_project"), ("dfplan.bench.dynamic", "run_dynamic_bench"),
        ("dfplan.harness.tasks", "write_task_yamls")]


def _leaves(cmd, path=()):
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                yield from _leaves(sub, path + (name,))
        if getattr(cmd, "invoke_without_command", False):
            yield path, cmd
    else:
        yield path, cmd


def _commands():
    out = []
    for name in SUBCOMMANDS:
        sub = cli.get_command(click.Context(cli), name)
        if sub is not None:
            out.extend(_leaves(sub, (name,)))
    return out


def _value_options(cmd):
    return [p for p in cmd.params if isinstance(p, click.Option) and not p.is_flag and not p.count
            and not p.hidden and p.name not in ("help",)]


def _base_value(opt, root):
    names = set(opt.opts)
    if names & {"--model", "--teacher", "--compare"}:
        return str(root / "nomodel")
    if "--corpus" in names or "--eval-corpus" in names or "--heldout" in names or "--table" in names:
        return str(root / "text.txt")
    if "--plan" in names:
        return "layout:dfssm"
    if "--tokens" in names or "--distill-tokens" in names:
        return "1k"
    if "--budget" in names:
        return "1MB"
    if "--out" in names:
        t = opt.type
        if isinstance(t, click.Path) and not t.dir_okay:
            return str(root / "out" / "o.csv")
        return str(root / "out")
    return "1"


def _cases(root):
    cases = []
    for path, cmd in _commands():
        opts = _value_options(cmd)
        base = []
        for o in opts:
            if o.required:
                base += [o.opts[0], _base_value(o, root)]
        for o in opts:
            for kind, val in BAD.items():
                args = list(path)
                for i in range(0, len(base), 2):
                    if base[i] not in o.opts:
                        args += base[i:i + 2]
                args += [o.opts[0], val]
                cases.append(pytest.param(args, id=f"{' '.join(path)} {o.opts[0]} {kind}"))
    return cases


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fuzz")
    (r / "nomodel").mkdir()
    (r / "text.txt").write_text("a few words of text\n" * 20)
    return r


def _stop(*a, **k):
    raise DfplanError("fuzz: reached the work")


@pytest.fixture(autouse=True)
def _no_work(monkeypatch, tmp_path):
    for mod, name in WORK:
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, name):
            monkeypatch.setattr(m, name, _stop)
    monkeypatch.chdir(tmp_path)                 # relative paths such as "-1" land here
    monkeypatch.setenv("DFPLAN_CACHE_DIR", str(tmp_path / ".cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _snapshot(*dirs):
    return sorted(str(p) for d in dirs for p in d.rglob("*") if ".cache" not in p.parts)


def test_fuzz_case_count(root):
    """The note's figure: how many cases the fuzz runs (and that it covers every command)."""
    cases = _cases(root)
    commands = {" ".join(c.values[0][:1]) for c in cases}
    assert len(cases) > 300 and {"search", "distill", "sensitivity", "zoo", "eval"} <= commands
    print(f"\n{len(cases)} fuzz cases over {len(_commands())} commands")


def pytest_generate_tests(metafunc):
    if "fuzz_args" in metafunc.fixturenames:
        import tempfile
        from pathlib import Path
        base = Path(tempfile.gettempdir()) / f"dfplan-fuzz-{os.getpid()}"
        metafunc.parametrize("fuzz_args", _cases(base))


def test_bad_value_is_one_error_line(fuzz_args, root, tmp_path, capsys):
    import tempfile
    from pathlib import Path
    placeholder = str(Path(tempfile.gettempdir()) / f"dfplan-fuzz-{os.getpid()}")
    args = [a.replace(placeholder, str(root)) for a in fuzz_args]
    before = _snapshot(root, tmp_path)
    rc = main(args)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert rc == 2, (rc, err[-2000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert _snapshot(root, tmp_path) == before, "files were left behind"
    assert not os.path.exists(BAD["nowhere"].split("/")[1] and "/" + BAD["nowhere"].split("/")[1]), \
        "a path-to-nowhere was created"
