"""The command lines that reproduce each artifact, rebuilt from the provenance it records.

Artifacts store their options (sensitivity.json `options`, plan.json `provenance.argv`,
distill.json, eval.json, bench `config`); a report shows them beside the figure they feed so a
reader can rerun exactly that stage. When a field is absent the command is left out rather
than guessed.
"""
from __future__ import annotations

from .fmt import shell_join


def _corpus(corpus) -> list[str]:
    return [a for c in (corpus or []) for a in ("--corpus", c)]


def sensitivity(prov: dict | None, out: str) -> str:
    o = (prov or {}).get("options") or {}
    if not o.get("model"):
        return ""
    argv = ["dfplan", "sensitivity", "--model", o["model"], *_corpus(o.get("corpus"))]
    for k, flag in (("windows", "--windows"), ("seq_len", "--seq-len")):
        if o.get(k) is not None:
            argv += [flag, o[k]]
    if o.get("candidates") not in (None, "default"):
        argv += ["--candidates", o["candidates"]]
    if o.get("random_init"):
        argv.append("--random-init")
    return shell_join(argv + ["--out", out])


def search(plan: dict | None, out_dir: str, sensitivity_path: str) -> str:
    p = (plan or {}).get("provenance") or {}
    argv = p.get("argv") or []
    # argv is the process's command line: from `dfplan search` it is the search itself, but a
    # search run inside `dfplan demo` records the demo's; rebuild the command then
    if argv[:1] == ["search"] and "--budget" in argv:
        return shell_join(["dfplan", *argv])
    if "--budget" in argv and argv[:1] != ["demo"]:
        return shell_join(["dfplan", "search", *argv])
    table = (p.get("scores_provenance") or {}).get("table")
    if table:
        sensitivity_path = table
    if not p.get("model") or p.get("budget") is None:
        return ""
    argv = ["dfplan", "search", "--model", p["model"], "--budget", p["budget"]]
    if p.get("scores") == "prior":
        argv.append("--prior")
    else:
        argv += ["--sensitivity", sensitivity_path]
    if p.get("solver_requested") not in (None, "milp"):
        argv += ["--solver", p["solver_requested"]]
    if p.get("objective") not in (None, "predicted"):
        argv += ["--objective", p["objective"]]
    return shell_join(argv + ["--out", out_dir])


def distill(meta: dict | None, out_dir: str) -> str:
    m = meta or {}
    if not m.get("teacher") or not m.get("plan"):
        return ""
    argv = ["dfplan", "distill", "--teacher", m["teacher"], "--plan", m["plan"], *_corpus(m.get("corpus"))]
    cfg = m.get("config") or {}
    if m.get("tokens_seen"):
        argv += ["--tokens", m["tokens_seen"]]
    if cfg.get("seq_len"):
        argv += ["--seq-len", cfg["seq_len"]]
    return shell_join(argv + ["--out", out_dir])


def evaluate(ev: dict | None, out: str, teacher: str | None) -> str:
    e = ev or {}
    if not e.get("model") or not e.get("corpus"):
        return ""
    argv = ["dfplan", "eval", "--model", e["model"]]
    if teacher and "teacher_ppl" in e:
        argv += ["--teacher", teacher]
    argv += _corpus(e["corpus"] if isinstance(e["corpus"], list) else [e["corpus"]])
    if e.get("seq_len"):
        argv += ["--seq-len", e["seq_len"]]
    if e.get("n_windows"):
        argv += ["--windows", e["n_windows"]]
    return shell_join(argv + ["--out", out])


def bench_kernels(res: dict | None, out_dir: str) -> str:
    c = (res or {}).get("config") or {}
    if not c:
        return ""
    argv = ["dfplan", "bench", "kernels", "--out", out_dir, "--model", c.get("model", "1.3b")]
    if c.get("batches"):
        argv += ["--batch", ",".join(str(b) for b in c["batches"])]
    if c.get("device"):
        argv += ["--device", c["device"]]
    if c.get("threads"):
        argv += ["--threads", c["threads"]]
    return shell_join(argv)


def demo(demo_json: dict | None, run_arg: str) -> str:
    if not demo_json:
        return ""
    c = demo_json.get("config") or {}
    argv = ["dfplan", "demo", "--out", run_arg]
    if c.get("threads"):
        argv += ["--threads", c["threads"]]
    return shell_join(argv)
