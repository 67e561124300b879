"""A run directory as the report sees it: which artifacts are there, read once, each use recorded.

Every stage writes plain files into one folder (`runs/<name>/`); the report reads them and
nothing else. Reading goes through RunDir so that
  - a corrupt file stops the report with one line naming the file and the stage to rerun,
  - every file the report used is recorded (the report lists them, and a check compares that
    list with what the run produced),
  - a missing file is simply None: its section says so in one line.
A second plan searched in the same run lives in a subfolder holding its own plan.json
(`runs/demo/dfssm/plan.json`, with its student/ and eval.json beside it): a plan variant.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from dfplan.errors import DfplanError

# artifact (relative to a run or plan-variant folder) -> the command that writes it
PRODUCERS = {
    "teacher/zoo.json": "dfplan zoo train",
    "teacher/config.json": "dfplan zoo train",
    "teacher/train_log.jsonl": "dfplan zoo train",
    "sensitivity.csv": "dfplan sensitivity",
    "sensitivity.json": "dfplan sensitivity",
    "sensitivity_blocks.csv": "dfplan sensitivity",
    "validation.json": "dfplan sensitivity validate",
    "plan.json": "dfplan search",
    "pareto.csv": "dfplan search",
    "study.db": "dfplan search --solver tpe|nsga2|all",
    "student/manifest.json": "dfplan distill",
    "student/config.json": "dfplan distill",
    "student/plan.json": "dfplan distill",
    "student/eval.json": "dfplan distill",
    "student/distill.json": "dfplan distill",
    "student/train_log.jsonl": "dfplan distill",
    "eval.json": "dfplan eval",
    "tasks.json": "dfplan eval --tasks",
    "demo.json": "dfplan demo",
    "run.json": "dfplan sensitivity / search (any stage command)",
    "bench/*.json": "dfplan bench",
}
# any one of these makes a folder a run directory
MARKERS = ("run.json", "plan.json", "sensitivity.csv", "student/manifest.json", "eval.json", "teacher/zoo.json",
           "demo.json", "bench/*.json")


def producer(rel: str) -> str:
    """The command that writes `rel` (a plan variant's files are named under its subfolder)."""
    for cand in (rel, rel.split("/", 1)[-1]):
        if cand.startswith("bench/"):
            return PRODUCERS["bench/*.json"]
        if cand in PRODUCERS:
            return PRODUCERS[cand]
    return "the stage that wrote it"


@dataclass
class RunDir:
    root: Path
    used: dict = field(default_factory=dict)     # relative path -> what the report used it for

    # -- paths ------------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.root / rel

    def has(self, rel: str) -> bool:
        return self.path(rel).is_file()

    def glob(self, pattern: str) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(pattern) if p.is_file())

    def use(self, rel: str, why: str) -> None:
        self.used.setdefault(rel, why)

    def _corrupt(self, rel: str, detail: str) -> DfplanError:
        return DfplanError(f"{self.path(rel)} is corrupt ({detail}); rerun `{producer(rel)}` to rewrite it, "
                           f"or delete it to leave its section out of the report")

    # -- readers: None when absent, DfplanError when unreadable -----------------------------
    def json(self, rel: str, why: str) -> dict | None:
        if not self.has(rel):
            return None
        try:
            d = json.loads(self.path(rel).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(rel, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if not isinstance(d, dict):
            raise self._corrupt(rel, f"expected a JSON object, found {type(d).__name__}")
        self.use(rel, why)
        return d

    def jsonl(self, rel: str, why: str) -> list[dict] | None:
        if not self.has(rel):
            return None
        rows = []
        try:
            lines = self.path(rel).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise self._corrupt(rel, type(e).__name__) from None
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise self._corrupt(rel, f"line {i}: {e.msg}") from None
            if not isinstance(r, dict):
                raise self._corrupt(rel, f"line {i} is not a JSON object")
            rows.append(r)
        self.use(rel, why)
        return rows

    def csv(self, rel: str, why: str, required: tuple = ()):
        """-> pandas DataFrame, or None when absent."""
        import pandas as pd
        if not self.has(rel):
            return None
        try:
            df = pd.read_csv(self.path(rel), comment="#")
        except Exception as e:      # pandas raises many types for malformed files
            raise self._corrupt(rel, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        missing = [c for c in required if c not in df.columns]
        if missing:
            raise self._corrupt(rel, f"missing columns {missing}")
        self.use(rel, why)
        return df


def open_run(path: str | Path) -> RunDir:
    """The run directory at `path`, or a DfplanError saying what was expected."""
    p = Path(path)
    expected = ("a run directory written by `dfplan demo` or the stage commands: a folder holding at least "
                "one of " + ", ".join(MARKERS))
    if not p.exists():
        raise DfplanError(f"{p} does not exist; expected {expected}")
    if not p.is_dir():
        raise DfplanError(f"{p} is a file; expected {expected}")
    run = RunDir(p)
    if not any(run.glob(m) for m in MARKERS):
        raise DfplanError(f"{p} is not a run directory: it holds none of the artifacts a report is made from; "
                          f"expected {expected}")
    return run


@dataclass(frozen=True)
class Variant:
    """One searched plan of the run and the artifacts beside it."""
    name: str           # "main" for the run folder itself, else the subfolder's name
    prefix: str         # "" or "dfssm/"

    def rel(self, name: str) -> str:
        return self.prefix + name


def plan_variants(run: RunDir) -> list[Variant]:
    """The run's own plan.json first, then every subfolder with a plan.json that is not a packed
    checkpoint (student/ carries a copy of its plan beside manifest.json)."""
    out = [Variant("main", "")] if run.has("plan.json") else []
    for d in sorted(p for p in run.root.iterdir() if p.is_dir()):
        if (d / "plan.json").is_file() and not (d / "manifest.json").exists():
            out.append(Variant(d.name, d.name + "/"))
    return out
