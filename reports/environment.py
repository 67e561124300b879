"""Environment block: the code and libraries each artifact was produced with, and the machine.

Read from the provenance every stage records (git commit, versions, threads, CPU); no clock is
read, so rendering the same run twice gives the same block.
"""
from __future__ import annotations

import platform
from importlib import metadata

from .context import Context
from .fmt import table


def _commit(c) -> str:
    if isinstance(c, dict):         # bench: {"commit": ..., "dirty": ...}
        c = (c.get("commit") or "")[:12] + ("+dirty" if c.get("dirty") else "") if c.get("commit") else None
    if not c:
        return "n/a"
    head, _, dirty = str(c).partition("+")
    return head[:12] + (f"+{dirty}" if dirty else "")


def _ver(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "n/a"


def _row(rel: str, d: dict) -> list[str]:
    v = d.get("versions") or {}
    if not isinstance(v, dict):
        v = {}
    commit = d.get("git_commit") or d.get("git") or (d.get("metadata") or {}).get("git")
    v = {**((d.get("metadata") or {}).get("versions") or {}), **v}
    threads = d.get("threads") or v.get("threads") or ((d.get("metadata") or {}).get("cpu") or {}).get("torch_threads")
    return [rel, _commit(commit), str(v.get("dfplan") or "n/a"), str(d.get("torch") or v.get("torch") or "n/a"),
            str(v.get("python") or "n/a"), "n/a" if threads is None else str(threads)]


def render(ctx: Context) -> str:
    rows = []
    sources = ["teacher/zoo.json", "sensitivity.json"]
    for v in ctx.variants:
        sources += [v.rel("student/distill.json"), v.rel("student/manifest.json")]
    for rel in sources:
        d = ctx.run.json(rel, "environment (git commit, versions)")
        if d:
            rows.append(_row(rel, d))
    for v in ctx.variants:
        p = ctx.plans.get(v.name)
        if p is not None and p.provenance:
            rows.append(_row(v.rel("plan.json"), p.provenance))
    cpu = None
    for rel in ctx.run.glob("bench/*.json"):
        d = ctx.run.json(rel, "benchmark results")
        rows.append(_row(rel, d))
        cpu = cpu or ((d.get("metadata") or {}).get("cpu") or {}).get("model")
    sens = ctx.run.json("sensitivity.json", "environment (git commit, versions)") or {}
    plat = (sens.get("versions") or {}).get("platform")
    out = ["## Environment", ""]
    if rows:
        out += ["What produced each artifact:", "",
                table(rows, ["artifact", "git commit", "dfplan", "torch", "python", "threads"]), ""]
    else:
        out += ["_No artifact of this run records its environment._", ""]
    if plat or cpu:
        out.append("Machine: " + ", ".join(x for x in (plat, cpu) if x) + ".")
    out.append(f"Report rendered with dfplan {_ver('dfplan')}, matplotlib {_ver('matplotlib')}, "
               f"pandas {_ver('pandas')}, tabulate {_ver('tabulate')}, Python {platform.python_version()}.")
    return "\n".join(out)
