"""Corpus resolution: turn `--corpus` values into a sorted list of text files.

Every `--corpus` option accepts, any number of times:
- `builtin`: the running Python's own standard-library sources and docs, a few MB of text
  that exists on every machine with no download (the default for the demo);
- `builtin-heldout`: about 1 MB of other standard-library files, disjoint from `builtin`
  (every file whose path hashes into one bucket of ten), for held-out evaluation;
- a text file;
- a folder, searched recursively for files matching `glob` (default `*.txt`);
- a glob pattern (`data/**/*.txt`).
"""
from __future__ import annotations

import glob as globlib
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import DfplanError

BUILTIN = "builtin"
BUILTIN_HELDOUT = "builtin-heldout"
# Large enough for a tiny teacher to learn real structure, small enough that tokenizing
# and training a tokenizer on it take seconds.
BUILTIN_MAX_BYTES = 4_000_000
HELDOUT_MAX_BYTES = 1_000_000
# Folders of the stdlib that are not representative source text (generated codec tables,
# regression-test data with odd encodings) or are not stdlib at all (third-party installs).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings",
              "__pycache__", "lib2to3", "turtledemo"}
# Prose first: pydoc's topic help is the standard library's documentation as text.
_BUILTIN_DOCS = ("pydoc_data/topics.py",)


@dataclass(frozen=True)
class CorpusFiles:
    """The resolved inputs of a corpus: what was asked for and the files it names."""
    specs: tuple[str, ...]
    files: tuple[Path, ...]

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)


def stdlib_dir() -> Path:
    # In a venv, "stdlib" still points at the base interpreter's library folder.
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(rel: str) -> bool:
    # a content-independent, machine-independent 10% of files by path
    return hashlib.sha256(rel.encode()).digest()[0] % 10 == 0


def builtin_files(max_bytes: int | None = None, heldout: bool = False) -> list[Path]:
    """Standard-library docs and *.py files in sorted order, capped at `max_bytes` in total.

    heldout=False gives the `builtin` corpus, heldout=True the disjoint `builtin-heldout`.
    """
    if max_bytes is None:
        max_bytes = HELDOUT_MAX_BYTES if heldout else BUILTIN_MAX_BYTES
    root = stdlib_dir()
    if not root.is_dir():
        raise DfplanError(f"the Python standard library folder {root} is missing; "
                          "pass --corpus PATH with your own text instead of 'builtin'")
    docs = [root / d for d in _BUILTIN_DOCS if (root / d).is_file()]
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                sources.append(Path(dirpath) / name)
    sources = sorted(set(sources) - set(docs), key=lambda p: p.relative_to(root).as_posix())
    pool = [p for p in docs + sources if _is_heldout(p.relative_to(root).as_posix()) == heldout]
    out, total = [], 0
    for path in pool:
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        out.append(path)
        total += size
    if not out:
        raise DfplanError(f"no Python sources found under {root} for the 'builtin' corpus; "
                          "pass --corpus PATH with your own text")
    return out


def _has_magic(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def resolve_corpus(specs: str | Sequence[str], glob: str = "*.txt") -> CorpusFiles:
    """Resolve corpus specs into files; raises DfplanError for paths that name no text."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [str(specs)]
    specs = [str(s) for s in specs]
    if not specs:
        raise DfplanError("no corpus given; pass --corpus builtin or --corpus PATH")
    files: list[Path] = []
    for spec in specs:
        files.extend(_resolve_one(spec, glob))
    # keep first occurrence order but drop duplicates (a file named twice counts once)
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return CorpusFiles(specs=tuple(specs), files=tuple(unique))


def _resolve_one(spec: str, glob: str) -> list[Path]:
    if spec == BUILTIN:
        return builtin_files()
    if spec == BUILTIN_HELDOUT:
        return builtin_files(heldout=True)
    path = Path(spec).expanduser()
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise DfplanError(f"corpus file {path} is not readable; check its permissions")
        return [path]
    if path.is_dir():
        found = sorted((p for p in path.rglob(glob) if p.is_file()),
                       key=lambda p: p.relative_to(path).as_posix())
        if not found:
            raise DfplanError(f"corpus folder {path} has no files matching {glob!r}; pass a pattern "
                              f"that matches your files instead, e.g. --corpus '{path}/**/*.md'")
        return found
    if _has_magic(spec):
        found = sorted(Path(p) for p in globlib.glob(os.path.expanduser(spec), recursive=True)
                       if Path(p).is_file())
        if not found:
            raise DfplanError(f"corpus pattern {spec!r} matches no files")
        return found
    raise DfplanError(f"corpus path {spec} does not exist; pass an existing file or folder, "
                      f"or '{BUILTIN}' for the built-in corpus")


def read_texts(files: Iterable[Path]) -> Iterable[tuple[Path, str]]:
    """Yield (path, text); undecodable bytes become U+FFFD rather than aborting a long run."""
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DfplanError(f"cannot read corpus file {path}: {e.strerror or e}") from None
        if b"\x00" in data[:8192]:
            raise DfplanError(f"corpus file {path} looks binary (NUL bytes); "
                              "pass text files only (a pattern such as --corpus 'DIR/**/*.txt' selects them)")
        yield path, data.decode("utf-8", errors="replace")
