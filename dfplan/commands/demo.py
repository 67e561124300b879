"""`dfplan demo`: the whole pipeline on the built-in default, offline, in a few CPU minutes.

teacher (tiny, builtin corpus) -> sensitivity -> search -> distill -> eval, all in one run
folder. Every stage is a function; a stage whose command does not exist yet is reported
as "not implemented yet", a stage whose output is already there is skipped ("cached"),
so an interrupted demo picks up where it stopped. A failed stage makes the later stages
that need its output skip and the demo exit non-zero.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from ..errors import DfplanError
from ._types import THREADS


@dataclass(frozen=True)
class DemoConfig:
    out: str = "runs/demo"
    corpus: tuple = ("builtin",)            # teacher + calibration + distillation text
    heldout: tuple = ("builtin-heldout",)   # evaluation text, disjoint from corpus
    teacher_steps: int = 200
    seq_len: int = 128
    calib_windows: int = 16
    budget: str = "40%"                     # percent of the teacher's fp16 bytes, or bytes
    # a second plan in dfssm/, searched among the DF-SSM formats only (1-bit scaffold + int8
    # low-rank correction of any rank per projection): on the tiny teacher the unrestricted
    # search prefers IntN at every budget, so this is where the format shows; the report sets
    # the two plans side by side
    dfssm_budget: str = "30%"
    distill_tokens: str = "100k"
    eval_windows: int = 32
    threads: int | None = None

    @property
    def run(self) -> Path:
        return Path(self.out)

    @property
    def teacher(self) -> Path:
        return self.run / "teacher"

    def log(self, stage: str) -> Path:
        return self.run / "logs" / f"{stage}.txt"


@dataclass(frozen=True)
class Stage:
    name: str
    output: str                             # relative to the run folder; present = done
    command: str | None                     # CLI subcommand it needs (None: always there)
    needs: tuple                            # outputs of earlier stages it reads
    run: Callable[[DemoConfig], None]
    result: Callable[[DemoConfig], str]     # one-line summary read back from its output


def _cli(argv: list[str], log: Path) -> None:
    """Run a subcommand in this process; its stdout (the JSON/tables it prints) goes to `log`,
    its progress and errors (stderr) stay on the terminal."""
    from ..cli import main
    click.echo(f"$ dfplan {' '.join(argv)}", err=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        rc = main(argv)
    if rc == 130:                           # Ctrl-C inside the stage: stop the whole demo
        raise KeyboardInterrupt
    if rc != 0:
        raise DfplanError(f"'dfplan {argv[0]}' exited with status {rc}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _fmt(x, spec=".2f") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "?"


def _corpus_args(corpus) -> list[str]:
    return [a for c in corpus for a in ("--corpus", c)]


# ---------------------------------------------------------------- stages
def _teacher(c: DemoConfig) -> None:
    from ..zoo import TrainConfig, train_teacher
    train_teacher(TrainConfig(out=str(c.teacher), preset="tiny", corpus=tuple(c.corpus),
                              steps=c.teacher_steps, seq_len=c.seq_len, threads=c.threads, resume=True),
                  say=lambda m: click.echo(m, err=True))


def _teacher_result(c: DemoConfig) -> str:
    m = _read_json(c.teacher / "zoo.json")
    return (f"val ppl {_fmt(m.get('val_ppl'))} vs unigram {_fmt(m.get('unigram_ppl'))}, "
            f"{_fmt(m.get('tokens_seen'), ',')} tokens at {_fmt(m.get('tokens_per_s'), ',.0f')} tok/s")


def _sensitivity(c: DemoConfig) -> None:
    _cli(["sensitivity", "--model", str(c.teacher), *_corpus_args(c.corpus),
          "--windows", str(c.calib_windows), "--seq-len", str(c.seq_len),
          "--out", str(c.run / "sensitivity.csv")]
         + (["--threads", str(c.threads)] if c.threads else []), c.log("sensitivity"))


def _sensitivity_result(c: DemoConfig) -> str:
    try:
        import pandas as pd
        df = pd.read_csv(c.run / "sensitivity.csv", comment="#")
    except Exception:
        return "?"
    return f"{len(df)} rows"


def _budget_bytes(c: DemoConfig, budget: str | None = None) -> str:
    budget = budget or c.budget
    if not budget.endswith("%"):
        return budget
    from ..loading import load_config
    from ..model import build_model
    fp16 = 2 * build_model(load_config(str(c.teacher)), device="meta").num_parameters()
    return str(int(fp16 * float(budget[:-1]) / 100))


def _dfssm_table(c: DemoConfig) -> Path:
    """dfssm/sensitivity.csv: the run's table with every projection restricted to 1-bit scaffold
    formats (bin, bin+rN); the embedding keeps its IntN rows (it cannot be binary)."""
    import shutil

    import pandas as pd

    from ..fileio import atomic_path
    df = pd.read_csv(c.run / "sensitivity.csv")
    keep = df[df["kind"].isin(["embedding", "lm_head"]) | df["spec"].str.startswith("bin")]
    out = c.run / "dfssm" / "sensitivity.csv"
    with atomic_path(out) as tmp:
        keep.to_csv(tmp, index=False)
    shutil.copyfile(c.run / "sensitivity.json", out.with_suffix(".json"))   # provenance: same model
    return out


def _search(c: DemoConfig, sub: str = "") -> None:
    table = _dfssm_table(c) if sub else c.run / "sensitivity.csv"
    _cli(["search", "--model", str(c.teacher), "--budget", _budget_bytes(c, c.dfssm_budget if sub else None),
          "--out", str(c.run / sub), "--sensitivity", str(table)], c.log("search" + (f"-{sub}" if sub else "")))


def _search_result(c: DemoConfig, sub: str = "") -> str:
    p = _read_json(c.run / sub / "plan.json")
    return (f"{_fmt(p.get('predicted_bytes'), ',')} bytes (budget {_fmt(p.get('budget_bytes'), ',')}), "
            f"predicted KL {_fmt(p.get('predicted_kl'), '.4g')}")


def _distill(c: DemoConfig, sub: str = "") -> None:
    _cli(["distill", "--teacher", str(c.teacher), "--plan", str(c.run / sub / "plan.json"),
          *_corpus_args(c.corpus), "--tokens", c.distill_tokens, "--seq-len", str(c.seq_len),
          "--out", str(c.run / sub / "student"), "--resume"]
         + (["--threads", str(c.threads)] if c.threads else []), c.log("distill" + (f"-{sub}" if sub else "")))


def _distill_result(c: DemoConfig, sub: str = "") -> str:
    m = _read_json(c.run / sub / "student" / "manifest.json")
    e = _read_json(c.run / sub / "student" / "eval.json")
    return (f"packed payload {_fmt(m.get('payload_bytes'), ',')} bytes; valid ppl student "
            f"{_fmt(e.get('student', {}).get('ppl'))} vs teacher {_fmt(e.get('teacher', {}).get('ppl'))}")


def _eval(c: DemoConfig, sub: str = "") -> None:
    _cli(["eval", "--model", str(c.run / sub / "student"), "--teacher", str(c.teacher),
          *_corpus_args(c.heldout), "--seq-len", str(c.seq_len), "--windows", str(c.eval_windows),
          "--out", str(c.run / sub / "eval.json")], c.log("eval" + (f"-{sub}" if sub else "")))


def _eval_result(c: DemoConfig, sub: str = "") -> str:
    e = _read_json(c.run / sub / "eval.json")
    return (f"held-out ppl student {_fmt(e.get('ppl'))} vs teacher {_fmt(e.get('teacher_ppl'))}, "
            f"KL {_fmt(e.get('kl_to_teacher'), '.4f')}")


STAGES: tuple[Stage, ...] = (
    Stage("teacher", "teacher/zoo.json", "zoo", (), _teacher, _teacher_result),
    Stage("sensitivity", "sensitivity.csv", "sensitivity", ("teacher/zoo.json",), _sensitivity,
          _sensitivity_result),
    Stage("search", "plan.json", "search", ("sensitivity.csv",), _search, _search_result),
    Stage("distill", "student/manifest.json", "distill", ("plan.json",), _distill, _distill_result),
    Stage("eval", "eval.json", "eval", ("student/manifest.json",), _eval, _eval_result),
    Stage("search-dfssm", "dfssm/plan.json", "search", ("sensitivity.csv",),
          functools.partial(_search, sub="dfssm"), functools.partial(_search_result, sub="dfssm")),
    Stage("distill-dfssm", "dfssm/student/manifest.json", "distill", ("dfssm/plan.json",),
          functools.partial(_distill, sub="dfssm"), functools.partial(_distill_result, sub="dfssm")),
    Stage("eval-dfssm", "dfssm/eval.json", "eval", ("dfssm/student/manifest.json",),
          functools.partial(_eval, sub="dfssm"), functools.partial(_eval_result, sub="dfssm")),
)


def implemented(command: str | None) -> bool:
    return command is None or importlib.util.find_spec(f"dfplan.commands.{command}") is not None


def run_demo(c: DemoConfig, stages: tuple[Stage, ...] | None = None) -> list[dict]:
    """Run every stage in order; returns one row per stage (stage, status, wall and CPU
    seconds, result)."""
    rows = []
    c.run.mkdir(parents=True, exist_ok=True)
    for st in STAGES if stages is None else stages:
        t0, c0 = time.perf_counter(), time.process_time()
        out = c.run / st.output
        missing = [n for n in st.needs if not (c.run / n).exists()]
        if out.exists():
            status = "cached"
        elif not implemented(st.command):
            status = "not implemented yet"
        elif missing:
            status = f"skipped (needs {', '.join(missing)})"
        else:
            click.echo(f"== {st.name}", err=True)
            try:
                st.run(c)
                status = "done" if out.exists() else f"failed (no {st.output} written)"
            except DfplanError as e:
                status = f"failed: {e}"
        result = st.result(c) if out.exists() else ""
        rows.append({"stage": st.name, "status": status, "wall_s": round(time.perf_counter() - t0, 1),
                     "cpu_s": round(time.process_time() - c0, 1), "result": result})
    from ..fileio import write_json_atomic
    write_json_atomic(c.run / "demo.json", {"config": {k: getattr(c, k) for k in c.__dataclass_fields__},
                                            "stages": rows})
    return rows


@click.command(name="demo", help="The whole pipeline on the built-in default teacher, offline.")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder; rerunning skips the stages whose output is there.")
@click.option("--corpus", multiple=True, default=("builtin",), show_default=True,
              help="Training / calibration text (repeatable).")
@click.option("--heldout", multiple=True, default=("builtin-heldout",), show_default=True,
              help="Evaluation text, disjoint from --corpus (repeatable).")
@click.option("--teacher-steps", default=200, show_default=True, type=click.IntRange(min=1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(min=8))
@click.option("--budget", default="40%", show_default=True,
              help="Memory budget: percent of the teacher's fp16 size, or bytes (300kB, 1MB).")
@click.option("--dfssm-budget", default="30%", show_default=True,
              help="Budget of the second plan (dfssm/): DF-SSM formats only, 1-bit scaffold + int8 corrections.")
@click.option("--distill-tokens", default="100k", show_default=True)
@click.option("--threads", default=None, type=THREADS, help="torch CPU threads.")
@click.option("--resume", is_flag=True, help="Continue an interrupted demo (what a rerun always does: "
              "finished stages are kept, an interrupted one continues).")
@click.option("--force", is_flag=True, help="Use a non-empty --out that is not a dfplan run folder.")
def command(out, corpus, heldout, teacher_steps, seq_len, budget, dfssm_budget, distill_tokens, threads, resume,
            force):
    _check_options(out, budget, distill_tokens, force)     # before torch: fails in a fraction of a second
    try:
        _check_options(out, dfssm_budget, distill_tokens, force)
    except DfplanError as e:
        raise DfplanError(str(e).replace("--budget", "--dfssm-budget")) from None
    click.echo(f"demo: run folder {out}; stages {' -> '.join(s.name for s in STAGES)} "
               "(finished stages are skipped)", err=True)
    from tabulate import tabulate
    c = DemoConfig(out=out, corpus=tuple(corpus), heldout=tuple(heldout), teacher_steps=teacher_steps,
                   seq_len=seq_len, budget=budget, dfssm_budget=dfssm_budget, distill_tokens=distill_tokens, threads=threads)
    t0 = time.perf_counter()
    try:
        rows = run_demo(c)
    except KeyboardInterrupt:
        click.echo(f"demo interrupted; `dfplan demo --out {out}` (or `make demo`) continues where it stopped",
                   err=True)
        raise
    _write_project(c)
    click.echo(tabulate(rows, headers="keys"))
    click.echo(f"demo: {time.perf_counter() - t0:.0f}s, outputs in {c.run}")
    # the run as a reader sees it: every stage's artifacts
    from ..reports import render_report
    click.echo(f"report: {render_report(c.run).path}")
    failed = [r["stage"] for r in rows if r["status"].startswith("failed")]
    if failed:
        raise DfplanError(f"demo stage(s) failed: {', '.join(failed)}; see the messages above")


def _check_options(out: str, budget: str, distill_tokens: str, force: bool) -> None:
    from ..runfolder import claim_run
    from ..sizes import parse_bytes, parse_count
    if budget.endswith("%"):
        try:
            pct = float(budget[:-1])
        except ValueError:
            pct = -1.0
        if not 0 < pct <= 100:
            raise DfplanError(f"--budget {budget!r}: a percentage must be in (0, 100]")
    else:
        parse_bytes(budget)
    parse_count(distill_tokens)
    claim_run(out, "", force=force, command="demo", check_model=False)


def _write_project(c: DemoConfig) -> None:
    """./dfplan.toml pointing at the demo's run (never over an existing one), so the next
    `dfplan search --budget 300kB` works as written."""
    from ..project import project_path, write_project
    path = project_path()
    if path is None or path.exists() or not (c.teacher / "zoo.json").exists():
        return
    try:
        path = write_project({"model": str(c.teacher), "corpus": list(c.corpus), "run": str(c.run),
                              "sensitivity": str(c.run / "sensitivity.csv")})
    except OSError:
        return
    click.echo(f"wrote {path}: `dfplan search --budget 300kB` now plans for the demo's teacher", err=True)
