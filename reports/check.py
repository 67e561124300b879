"""Does a report name every artifact its run produced?  `python -m dfplan.reports.check RUN [REPORT]`

CI runs this after `make demo`: a stage that starts writing a new file makes the check fail
until the report renders (or at least lists) it. Artifacts are the run's data and metadata
files (.json, .jsonl, .csv, .md, .db); not artifacts: logs/, tokenizers, weights and other
binary payloads (their manifest is the artifact), parquet twins of a CSV, the report itself and
its figures. Exit status 1 lists the files the report's "Artifacts used" table does not name.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from .render import USED_HEADING

DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".md", ".db")
NOT_ARTIFACTS = ("tokenizer.json",)


def produced(run: Path, report: Path) -> list[str]:
    """Artifacts of the run (relative paths), the report's own outputs left out."""
    run, report = Path(run), Path(report)
    figs = report.parent / f"{report.stem}_figures"
    out = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run)
        if not p.is_file() or p.suffix not in DATA_SUFFIXES or p.name in NOT_ARTIFACTS:
            continue
        if rel.parts[0] == "logs" or any(part.startswith(".") for part in rel.parts):
            continue
        if p.resolve() == report.resolve() or figs.resolve() in p.resolve().parents:
            continue
        out.append(rel.as_posix())
    return out


def named(report_text: str) -> set[str]:
    """Files listed in the report's "Artifacts used" table."""
    if USED_HEADING not in report_text:
        return set()
    section = report_text.split(USED_HEADING, 1)[1]
    return set(re.findall(r"^\|\s*`([^`]+)`", section, flags=re.M))


def check_report(run: str | Path, report: str | Path | None = None) -> list[str]:
    """-> the artifacts of `run` that `report` (default RUN/report.md) does not name."""
    run = Path(run)
    report = Path(report) if report is not None else run / "report.md"
    listed = named(report.read_text())
    return [rel for rel in produced(run, report) if rel not in listed]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or len(argv) > 2 or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[0])
        return 2
    run = Path(argv[0])
    report = Path(argv[1]) if len(argv) > 1 else run / "report.md"
    if not report.is_file():
        print(f"error: {report} does not exist; run `dfplan report {run}` first", file=sys.stderr)
        return 1
    left = check_report(run, report)
    if left:
        print(f"{report} does not name {len(left)} artifact(s) of {run}:", file=sys.stderr)
        for rel in left:
            print(f"  {rel}", file=sys.stderr)
        return 1
    print(f"{report} names all {len(produced(run, report))} artifacts of {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
