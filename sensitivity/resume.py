"""Partial results of a long run, one file per finished job, so an interrupted run resumes.

The folder holds run.json (the run key: model fingerprint, calibration windows hash,
analyzer settings) and one JSON file per job. A rerun with the same key skips the jobs
already on disk; a different key is refused rather than mixed into the table. Floats go
through JSON's repr round-trip, so resumed numbers are bit-identical to fresh ones.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from dfplan.errors import DfplanError
from dfplan.fileio import write_json_atomic

from .analyzer import JobResult

RUN_FILE = "run.json"


def _fname(job_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", job_id) + ".json"


class PartialStore:
    def __init__(self, directory: str | Path, run_key: dict):
        self.dir = Path(directory)
        self.key = run_key

    def prepare(self, restart: bool = False) -> int:
        """Create the folder or check it belongs to this run; -> jobs already done.
        Call from one process only (rank 0), before the others call load()."""
        run_file = self.dir / RUN_FILE
        if restart and self.dir.exists():
            shutil.rmtree(self.dir)
        if run_file.exists():
            try:
                old = json.loads(run_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.key:
                raise DfplanError(f"{self.dir} holds partial results of a different sensitivity run (other model, "
                                  "windows or settings); pass --restart to discard them or use another --out")
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run_file, self.key)
        return len(self.load())

    def load(self) -> dict[str, JobResult]:
        out = {}
        if not self.dir.is_dir():
            return out
        for f in sorted(self.dir.glob("*.json")):
            if f.name == RUN_FILE:
                continue
            try:
                res = JobResult.from_dict(json.loads(f.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                continue        # a torn or foreign file: that job simply runs again
            out[res.job_id] = res
        return out

    def save(self, result: JobResult) -> None:
        write_json_atomic(self.dir / _fname(result.job_id), result.to_dict())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
