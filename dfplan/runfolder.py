"""Run folders and early argument checks, before torch is imported or a model is loaded.

Every command that writes calls these first, so bad input costs a fraction of a second and
leaves nothing behind:
  check_out_dir / check_out_file   the path can be written (probed with a temp file that is
                                   removed at once; /proc, a path under a file, a read-only
                                   folder all fail here, not after the work);
  check_model_arg                  a local model path exists (hub ids and presets pass);
  claim_run                        a run folder belongs to one model: `run.json` records the
                                   model and its fingerprint; a command for another model, or a
                                   non-empty folder that holds neither a run.json nor only
                                   dfplan's own outputs, is refused unless --force;
  record_run                       writes/updates run.json after the command succeeded.
This module imports neither torch nor anything that does.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import DfplanError
from .fileio import write_json_atomic

RUN = "run.json"
# what dfplan's own commands leave in a run folder (a folder holding only these is ours)
OWN_NAMES = {
    RUN, "demo.json", "dfplan.toml", "teacher", "student", "logs", "bench", "sensitivity.csv",
    "sensitivity.parquet", "sensitivity.json", "sensitivity_blocks.csv", "sensitivity_blocks.parquet",
    "sensitivity.partial", "plan.json", "plan.md", "pareto.csv", "study.db", "study.db-wal", "study.db-shm",
    "study.db-journal", "eval.json",
    "validation.json", "validation.md", "report.md", "kernels.json", "packed",
    "report_figures", "dfssm",      # dfplan report's figures; the demo's second (DF-SSM) plan
    "probe",                        # dfplan probe --out RUN/probe
}
_FP_CHUNK = 8 << 20          # bytes hashed at each end of a weight file


def is_temp_leftover(name: str) -> bool:
    """A temp file of fileio.atomic_path that a killed process never renamed."""
    return name.startswith(".") and name.endswith(".tmp")


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _probe_writable(folder: Path) -> bool:
    """Really try: os.access says yes for root even on /proc and read-only mounts."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dfplan-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(tmp)
    return True


def check_out_dir(path, flag: str = "--out") -> Path:
    """A folder we may create or write into; raises DfplanError naming the problem."""
    if path is None or str(path).strip() == "":
        raise DfplanError(f"{flag} is empty; pass a folder")
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise DfplanError(f"{flag} {p} is a file; pass a folder")
    base = _nearest_existing(p)
    if not base.is_dir():
        raise DfplanError(f"cannot write {flag} {p}: {base} is not a writable folder (it is a file)")
    if not _probe_writable(base):
        raise DfplanError(f"cannot write {flag} {p}: {base} is not a writable folder")
    return p


def check_out_file(path, flag: str = "--out") -> Path:
    """A file we may create or replace."""
    if path is None or str(path).strip() == "":
        raise DfplanError(f"{flag} is empty; pass a file name")
    p = Path(path).expanduser()
    if p.is_dir():
        raise DfplanError(f"{flag} {p} is a folder; pass a file name")
    check_out_dir(p.parent, flag)
    return p


def _json_object(path: Path) -> bool:
    """A JSON object: what every dfplan result file is (a user's notes, CSVs or weights are not)."""
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def check_result_file(path, flag: str = "--out", force: bool = False) -> Path:
    """A result JSON we may write: new, or an earlier result (replaced); another file is refused
    unless --force, so a typo never overwrites something that is not ours."""
    p = check_out_file(path, flag)
    if p.exists() and not force and not _json_object(p):
        raise DfplanError(f"{flag} {p} exists and is not a dfplan result (not a JSON object); "
                          "choose another file name or pass --force")
    return p


def check_result_dir(path, own: set | frozenset, flag: str = "--out", force: bool = False) -> Path:
    """A folder for result files named in `own` (plus earlier JSON results); a folder holding
    anything else is refused unless --force."""
    p = check_out_dir(path, flag)
    if p.is_dir() and not force:
        foreign = sorted(n for n in os.listdir(p) if n not in own and n not in OWN_NAMES
                         and not is_temp_leftover(n) and not (n.endswith(".json") and _json_object(p / n)))
        if foreign:
            raise DfplanError(f"{flag} {p} is not empty and holds files dfplan did not write "
                              f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                              "choose an empty folder or pass --force")
    return p


def check_in_file(path, flag: str) -> Path:
    p = Path(str(path)).expanduser()
    if not str(path).strip() or not p.is_file():
        raise DfplanError(f"{flag} {str(path)!r} is not a file")
    return p


def check_model_arg(model_arg, flag: str = "--model") -> None:
    """Fail fast on a local path that is not there; presets and hub ids are checked later."""
    a = str(model_arg or "").strip()
    if not a:
        raise DfplanError(f"{flag} is empty; pass a checkpoint folder, hub id or preset:NAME")
    if a.startswith("preset:") or a.startswith("layout:"):
        return
    p = Path(a).expanduser()
    if p.exists():
        if not p.is_dir():
            raise DfplanError(f"{flag} {p} is a file; pass the folder holding config.json")
        return
    if a.count("/") == 1 and not a.startswith((".", "/", "~")):
        return                                           # owner/name on the hub
    raise DfplanError(f"{flag} {a!r} is neither a folder, a hub id (owner/name) nor preset:NAME")


def check_corpus(specs, flag: str = "--corpus") -> None:
    """Each corpus spec names something: 'builtin', 'builtin-heldout', a path, or a glob that matches."""
    import glob as globlib
    for spec in specs or ():
        s = str(spec).strip()
        if s in ("builtin", "builtin-heldout"):
            continue
        if not s:
            raise DfplanError(f"{flag} is empty; pass a file, folder, glob or 'builtin'")
        if Path(s).expanduser().exists():
            continue
        if any(c in s for c in "*?[") and globlib.glob(os.path.expanduser(s), recursive=True):
            continue
        if any(c in s for c in "*?["):
            raise DfplanError(f"corpus pattern {s!r} matches no files")
        raise DfplanError(f"corpus path {s} does not exist; pass an existing file or folder, "
                          "or 'builtin' for the built-in corpus")


# -- model identity -------------------------------------------------------------------------------

def model_fingerprint(model_arg: str, random_init: bool = False) -> str:
    """sha256 over config.json and each weight file's size and first/last 8 MiB: cheap enough
    for a 1.3B checkpoint, different for any two models a run folder could mix up."""
    h = hashlib.sha256()
    p = Path(model_arg).expanduser()
    if not p.is_dir():                                   # preset or hub id: the name is the identity
        h.update(f"{model_arg}|random_init={random_init}".encode())
        return h.hexdigest()
    for name in sorted(os.listdir(p)):
        f = p / name
        if not f.is_file() or not (name == "config.json" or name.endswith((".safetensors", ".bin"))):
            continue
        size = f.stat().st_size
        h.update(f"{name}|{size}|".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_FP_CHUNK))
            if size > 2 * _FP_CHUNK:
                fh.seek(size - _FP_CHUNK)
                h.update(fh.read(_FP_CHUNK))
    return h.hexdigest()


@dataclass(frozen=True)
class RunClaim:
    folder: Path
    model: str
    fingerprint: str


def read_run(folder) -> dict | None:
    try:
        d = json.loads((Path(folder) / RUN).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def claim_run(folder, model_arg: str, *, force: bool = False, random_init: bool = False,
              command: str = "", own: set | frozenset = frozenset(), check_model: bool = True) -> RunClaim:
    """Check that `folder` may take outputs computed from `model_arg` (writes nothing).

    own: further names this command writes (e.g. a sensitivity table named after --out);
    check_model False: only the folder (the demo, whose model does not exist yet)."""
    folder = check_out_dir(folder)
    fp = model_fingerprint(model_arg, random_init) if check_model else ""
    run = read_run(folder)
    if run is not None and check_model:
        if run.get("fingerprint") != fp and not force:
            raise DfplanError(f"{folder} holds outputs of model {run.get('model')!r} "
                              f"({str(run.get('fingerprint'))[:12]}), not of {model_arg!r} ({fp[:12]}); "
                              "choose another --out (or --force to mix them)")
    elif folder.is_dir() and not force:
        foreign = sorted(n for n in os.listdir(folder) if n not in OWN_NAMES and n not in own
                         and not is_temp_leftover(n))
        if foreign:
            what = f"dfplan {command}" if command else "dfplan"
            raise DfplanError(f"--out {folder} is not empty and is not a {what} run folder "
                              f"(it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                              "choose an empty folder or pass --force")
    return RunClaim(folder, model_arg, fp)


def claim_if_run_folder(folder, model_arg: str, *, force: bool = False, random_init: bool = False,
                        own: set | frozenset = frozenset()) -> RunClaim | None:
    """For commands whose --out is a file: refuse mixing models in a run folder, and claim the
    folder only when it is one (run.json, or nothing but dfplan's outputs) so run.json is never
    dropped into an arbitrary working directory."""
    try:
        return claim_run(folder, model_arg, force=force, random_init=random_init, own=own)
    except DfplanError:
        if read_run(folder) is not None and not force:
            raise                                       # another model's run folder
        return None


def check_same_model(folder, model_arg: str, force: bool = False) -> None:
    """Refuse outputs of `model_arg` under a run folder whose run.json names another model."""
    run = read_run(folder)
    if run is None or force:
        return
    fp = model_fingerprint(model_arg)
    if run.get("fingerprint") != fp:
        raise DfplanError(f"{folder} holds outputs of model {run.get('model')!r} "
                          f"({str(run.get('fingerprint'))[:12]}), not of {model_arg!r} ({fp[:12]}); "
                          "choose another --out")


def record_run(claim: RunClaim, command: str) -> None:
    """Note in run.json that `command` wrote here for this model (after it succeeded)."""
    run = read_run(claim.folder) or {}
    if run.get("fingerprint") != claim.fingerprint:
        run = {"model": claim.model, "fingerprint": claim.fingerprint, "commands": {}}
    run.setdefault("commands", {})[command] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(claim.folder / RUN, run)
