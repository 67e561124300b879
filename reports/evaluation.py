"""Evaluation: teacher vs students on the same held-out text, with chance levels.

Perplexity comes from distill's eval.json (teacher, the plan applied untrained, its scaffold
alone, the distilled student; same windows) and `dfplan eval`'s eval.json (the packed artifact on
held-out text). The chance level of perplexity is the vocabulary size (a uniform guess); the
teacher's unigram baseline is shown beside it. Zero-shot task results, when an eval.json holds
them (lm-eval's `results` layout: {task: {"acc,none": x, "acc_stderr,none": s}}), get a table
with each task's chance accuracy.
"""
from __future__ import annotations

from . import commands
from .context import Context
from .fmt import fixed, is_num, missing, sig, table

# accuracy of a uniform guess over the answer choices (LAMBADA is open-ended: 0)
CHANCE = {"piqa": 0.5, "winogrande": 0.5, "boolq": 0.5, "copa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25,
          "hellaswag": 0.25, "openbookqa": 0.25, "sciq": 0.25, "lambada": 0.0, "lambada_openai": 0.0,
          "lambada_standard": 0.0}
ROWS = (("teacher", "teacher (fp)"), ("ptq", "plan applied, untrained"),
        ("scaffold_only", "scaffold only (corrections dropped)"), ("student", "distilled student (packed)"))


def chance(task: str):
    t = task.lower()
    return CHANCE.get(t, CHANCE.get(t.split(",")[0]))


SKIP_KEYS = ("source", "chance", "n_docs_in_file")
PPL_KEYS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _dfplan_tasks(ev: dict) -> tuple[dict, dict]:
    """`dfplan eval --tasks` output ({tasks, perplexity} for one model, or {model: ..., teacher: ...}
    with --compare) -> ({label: {(task, metric): (value, stderr)}}, {task: chance})."""
    pairs = ([("student", ev["model"]), ("teacher", ev["teacher"])]
             if isinstance(ev.get("model"), dict) and isinstance(ev["model"].get("tasks"), dict)
             and isinstance(ev.get("teacher"), dict) else [("evaluated model", ev)])
    out, chances = {}, {}
    for label, r in pairs:
        vals = {}
        for task, row in (r.get("tasks") or {}).items():
            if not isinstance(row, dict):
                continue
            if is_num(row.get("chance")):
                chances[task] = row["chance"]
            for m, v in row.items():
                if m in SKIP_KEYS or m.endswith("_stderr") or not is_num(v):
                    continue
                se = row.get(m + "_stderr")
                vals[(task, m)] = (v, se if is_num(se) else None)
        for task, p in (r.get("perplexity") or {}).items():
            for m in PPL_KEYS:
                if is_num((p or {}).get(m)):
                    vals[(task, m)] = (p[m], None)
        if vals:
            out[label] = vals
    return out, chances


def task_results(ev: dict) -> dict[str, dict[str, tuple]]:
    """{model label: {(task, metric): (value, stderr)}} from lm-eval-style `results` blocks at the
    top level (the evaluated model) and under `teacher` / `compare` (the reference)."""
    out = {}
    blocks = [("evaluated model", ev)] + [(k, ev[k]) for k in ("teacher", "compare") if isinstance(ev.get(k), dict)]
    for label, b in blocks:
        res = b.get("results")
        if not isinstance(res, dict):
            continue
        vals = {}
        for task, metrics in res.items():
            if not isinstance(metrics, dict):
                continue
            for key, v in metrics.items():
                name = key.split(",")[0]
                if name.endswith("_stderr") or not is_num(v) or name not in ("acc", "acc_norm", "word_perplexity",
                                                                              "byte_perplexity", "perplexity"):
                    continue
                se = metrics.get(key.replace(name, name + "_stderr", 1))
                vals[(task, name)] = (v, se if is_num(se) else None)
        if vals:
            out[label] = vals
    return out


def _tasks_table(per_model: dict, chances: dict | None = None) -> str:
    labels = list(per_model)
    keys = sorted({k for v in per_model.values() for k in v})
    rows = []
    for task, metric in keys:
        c = (chances or {}).get(task, chance(task)) if metric.startswith("acc") else None
        r = [task, metric, "" if c is None else fixed(c, 3)]
        for lab in labels:
            v = per_model[lab].get((task, metric))
            r.append("" if v is None else fixed(v[0], 4) + ("" if v[1] is None else f" ± {fixed(v[1], 4)}"))
        rows.append(r)
    return table(rows, ["task", "metric", "chance"] + labels)


def render(ctx: Context) -> str:
    out = ["## Evaluation", ""]
    zoo = ctx.run.json("teacher/zoo.json", "teacher summary (perplexity vs unigram)") or {}
    vocab = ctx.cfg.vocab_size if ctx.cfg is not None else None
    any_data = False
    rows = []
    for v in ctx.variants or []:
        ev = ctx.run.json(v.rel("student/eval.json"), "teacher vs student perplexity and KL (same windows)")
        if ev is None:
            out.append(missing(v.rel("student/eval.json"), "dfplan distill", f"{v.name}: teacher vs student"))
            continue
        any_data = True
        src = ev.get("source") or {}
        where = f"{ev.get('windows', '?')} x {ev.get('seq_len', '?')} tokens, {src.get('split', '?')} split"
        for key, label in ROWS:
            r = ev.get(key)
            if not isinstance(r, dict):
                continue
            if key == "teacher" and any(x[0] == "teacher (fp)" for x in rows):
                continue
            if key == "scaffold_only" and r == ev.get("ptq"):
                continue        # no scaffold in this plan: dropping corrections changes nothing
            rows.append([label if key == "teacher" else f"{v.name}: {label}", fixed(r.get("ppl")),
                         sig(r.get("kl_to_teacher")), where, v.rel("student/eval.json")])
    held = []
    for v in ctx.variants or [None]:
        rel = v.rel("eval.json") if v else "eval.json"
        e = ctx.run.json(rel, "held-out perplexity of the packed artifact")
        name = v.name if v else "model"
        if e is None:
            out.append(missing(rel, "dfplan eval", f"{name}: held-out perplexity"))
            continue
        any_data = True
        where = f"{e.get('n_windows', '?')} x {e.get('seq_len', '?')} tokens, held-out text"
        if "teacher_ppl" in e and not any(x[0] == "teacher (fp), held-out" for x in held):
            held.append(["teacher (fp), held-out", fixed(e["teacher_ppl"]), "0", where, rel])
        held.append([f"{name}: packed student, held-out", fixed(e.get("ppl")), sig(e.get("kl_to_teacher")), where, rel])
        tasks = task_results(e)
        if tasks:
            out += ["", f"Zero-shot tasks ({rel}):", "", _tasks_table(tasks)]
    for v in ctx.variants or [None]:
        rel = v.rel("tasks.json") if v else "tasks.json"
        t = ctx.run.json(rel, "zero-shot tasks and standard perplexity (dfplan eval --tasks)")
        if t is None:
            continue
        any_data = True
        per_model, chances = _dfplan_tasks(t)
        out += ["", f"Zero-shot tasks and standard perplexity (`{rel}`; chance = a uniform guess over the "
                    "choices):", "", _tasks_table(per_model, chances) if per_model else f"`{rel}` holds no task results."]
    if not any_data:
        return "\n".join(out)
    chance_rows = []
    if vocab:
        chance_rows.append(["chance: uniform over the vocabulary", fixed(float(vocab)), "", "any text", "model config"])
    if zoo.get("unigram_ppl") is not None:
        chance_rows.append(["unigram baseline (teacher's validation windows)", fixed(zoo["unigram_ppl"]), "",
                            f"{zoo.get('val_windows', '?')} windows", "teacher/zoo.json"])
    body = rows + held + chance_rows
    ev_cmds = [commands.evaluate(ctx.run.json(v.rel("eval.json"), "held-out perplexity of the packed artifact"),
                                 ctx.path_arg(v.rel("eval.json")), ctx.path_arg("teacher"))
               for v in ctx.variants]
    out = out[:2] + ["Perplexity (lower is better) and KL(teacher || model) in nats/token:", "",
                     table(body, ["model", "perplexity", "KL to teacher", "text", "from"]), ""] + out[2:]
    out += ["", ctx.reproduce(*ev_cmds)]
    return "\n".join(out)
