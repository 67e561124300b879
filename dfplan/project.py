"""`dfplan.toml`: a project file in the working directory that gives commands their defaults.

    model = "runs/demo/teacher"          # --model (search, sensitivity), --teacher (distill)
    corpus = ["builtin"]                 # --corpus
    sensitivity = "runs/demo/sensitivity.csv"
    run = "runs/demo"                    # the run folder: search's --out

Written by `dfplan init --model M --corpus C` and by `dfplan demo`; options on the command
line always win. DFPLAN_PROJECT names another file ('none' disables it; the tests do). Read with tomllib; written by the few lines below (four keys, strings and
lists of strings), so no TOML writer is needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import DfplanError
from .fileio import write_text_atomic

PROJECT = "dfplan.toml"
KEYS = ("model", "corpus", "sensitivity", "run")
HOW = "run `dfplan init --model M --corpus C` (or `dfplan demo`) to write a dfplan.toml here"


def project_path(cwd=None) -> Path | None:
    """./dfplan.toml, or $DFPLAN_PROJECT; None when that is 'none' or empty (the tests set it)."""
    env = os.environ.get("DFPLAN_PROJECT")
    if env is not None and cwd is None:
        return Path(env) if env.strip() and env != "none" else None
    return Path(cwd or ".") / PROJECT


def load_project(cwd=None) -> dict:
    """The project's defaults ({} without a dfplan.toml); a malformed file is a user error."""
    path = project_path(cwd)
    if path is None or not path.is_file():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:                      # python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise DfplanError(f"reading {path} needs python >= 3.11 or the tomli package") from None
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise DfplanError(f"cannot read {path}: {e}") from None
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise DfplanError(f"{path} has unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    for k in ("model", "sensitivity", "run"):
        if k in data and not isinstance(data[k], str):
            raise DfplanError(f"{path}: {k} must be a string")
    corpus = data.get("corpus")
    if isinstance(corpus, str):
        data["corpus"] = [corpus]
    elif corpus is not None and not (isinstance(corpus, list) and all(isinstance(c, str) for c in corpus)):
        raise DfplanError(f"{path}: corpus must be a string or a list of strings")
    return data


def render_project(values: dict) -> str:
    """TOML for our four keys (JSON strings are valid TOML basic strings)."""
    lines = ["# dfplan project defaults; command-line options override them"]
    for k in KEYS:
        v = values.get(k)
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            lines.append(f"{k} = [{', '.join(json.dumps(str(x)) for x in v)}]")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


def write_project(values: dict, cwd=None, overwrite: bool = False) -> Path:
    path = project_path(cwd)
    if path is None:
        raise DfplanError("DFPLAN_PROJECT is 'none': no project file to write")
    if path.exists() and not overwrite:
        raise DfplanError(f"{path} exists; pass --force to replace it")
    write_text_atomic(path, render_project(values))
    return path


def default(value, key: str, flag: str, command: str, required: bool = True):
    """value if given, else the project's `key`; a missing required one says how to set it."""
    if value not in (None, (), []):
        return value
    proj = load_project()
    if key in proj:
        return tuple(proj[key]) if key == "corpus" else proj[key]
    if not required:
        return value
    path = project_path()
    if path is not None and path.is_file():
        raise DfplanError(f"dfplan {command} needs {flag} (or `{key} = ...` in {path})")
    raise DfplanError(f"dfplan {command} needs {flag}: pass it, or {HOW}")
