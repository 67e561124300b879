"""Run import-linter on the package as it is installed, not as it lies on disk.

pyproject maps top-level folders into the package (sensitivity/ -> dfplan.sensitivity, ...);
import-linter finds modules by walking the root package's folder, so it would not see them.
This copies the tree into a temporary folder laid out as the installed package and runs
`lint-imports` there with the contracts of pyproject.toml. Exit status: lint-imports'.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def shadow_tree(dest: Path) -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "csrc")
    for pkg, folder in sorted(cfg["package-dir"].items(), key=lambda kv: kv[0].count(".")):
        target = dest.joinpath(*pkg.split("."))
        shutil.copytree(ROOT / folder, target, ignore=ignore, dirs_exist_ok=True)


def main() -> int:
    lint = Path(sys.executable).with_name("lint-imports")
    with tempfile.TemporaryDirectory(prefix="dfplan-lint-") as tmp:
        shadow_tree(Path(tmp))
        return subprocess.call([str(lint), str(ROOT / "pyproject.toml"), *sys.argv[1:]], cwd=tmp)


if __name__ == "__main__":
    sys.exit(main())
