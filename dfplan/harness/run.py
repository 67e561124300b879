"""`dfplan eval --tasks`: perplexity by the standard protocol plus lm-eval zero-shot tasks on
exactly the artifact given, written as one results JSON (lm-eval's own output included)."""
from __future__ import annotations

import math
import os
import platform
import tempfile
import time
from pathlib import Path

from ..errors import DfplanError
from ..fileio import write_json_atomic
from ..provenance import git_commit
from . import tasks as T
from .artifact import artifact_info
from .ppl import count_words, standard_text, text_perplexity

CHANCE_NOTE = "chance = mean over the evaluated examples of 1/number of choices"


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _clean(x):
    """lm-eval's results hold numpy scalars, callables and 'N/A' strings; keep JSON values."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if hasattr(x, "item"):
        return _clean(x.item())
    return str(x)


def _task_rows(resolved: list[T.ResolvedTask], lm_results: dict) -> dict:
    """Per task: each metric with its stderr, and chance level beside accuracies."""
    rows = {}
    for t in resolved:
        if t.lm_eval_name is None:
            continue
        r = lm_results.get(t.lm_eval_name, {})
        row = {"source": str(t.path) if t.path else f"lm-eval hub task {t.lm_eval_name}"}
        for key, v in r.items():
            if "," not in key or key.startswith("alias"):
                continue
            metric, _filter = key.split(",", 1)
            if metric.endswith("_stderr"):
                row[metric] = v if isinstance(v, (int, float)) else None
            else:
                row[metric] = v
        if t.chance is not None:
            row["chance"] = round(t.chance, 6)
        if t.n_docs is not None:
            row["n_docs_in_file"] = t.n_docs
        rows[t.name] = row
    return rows


def evaluate_tasks(model_arg: str, task_names: list[str], *, data_dir: str | None = None,
                   limit: int | None = None, batch_size: int = 8, max_length: int | None = None,
                   stride: int | None = None, tokenizer: str | None = None, dtype: str | None = None,
                   device: str | None = None, bootstrap_iters: int = 1000, progress: bool = True) -> dict:
    """Evaluate one model on the given tasks; returns a JSON-able dict."""
    resolved = T.resolve(task_names, data_dir, limit)               # bad names/files fail before loading
    needs_hub = any(t.lm_eval_name and t.path is None for t in resolved)
    if not needs_hub:
        # every set is local: make sure nothing below reaches for the network
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(var, "1")
    from .lm import DfplanLM  # imports lm-eval (after the offline switches are set)

    lm = DfplanLM(pretrained=model_arg, tokenizer=tokenizer, batch_size=batch_size,
                  max_length=max_length, stride=stride, dtype=dtype, device=device)
    return evaluate_loaded(lm, resolved, model_arg=model_arg, limit=limit, batch_size=batch_size,
                           bootstrap_iters=bootstrap_iters, progress=progress)


def evaluate_loaded(lm, resolved: list[T.ResolvedTask], *, model_arg: str | None = None,
                    limit: int | None = None, batch_size: int = 8, bootstrap_iters: int = 1000,
                    progress: bool = True) -> dict:
    """Evaluate a constructed DfplanLM on resolved tasks."""
    needs_hub = any(t.lm_eval_name and t.path is None for t in resolved)
    t0 = time.perf_counter()
    result: dict = {
        "model": artifact_info(model_arg or lm.pretrained, lm.model),
        "settings": {"tasks": [t.name for t in resolved], "limit": limit, "batch_size": batch_size,
                     "max_length": lm.max_length, "stride": lm.stride, "trained_context": lm.trained_context,
                     "bootstrap_iters": bootstrap_iters, "num_fewshot": 0, "chance_note": CHANCE_NOTE},
        "perplexity": {}, "tasks": {},
    }
    for t in resolved:
        if t.lm_eval_name is not None:
            continue
        text = standard_text(t.spec.ppl_format, t.path, limit)
        ids = lm.tok_encode(text)
        res = text_perplexity(lm.model, ids, lm.prefix_token_id, lm.max_length, lm.stride,
                              n_words=count_words(text), n_bytes=len(text.encode("utf-8")),
                              batch_size=batch_size, vocab_size=lm.vocab_size, progress=progress)
        result["perplexity"][t.name] = {"source": str(t.path), "protocol": t.spec.note,
                                        "rows_limit": limit, **res.to_dict()}

    lm_tasks = [t for t in resolved if t.lm_eval_name is not None]
    if lm_tasks:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
        with tempfile.TemporaryDirectory(prefix="dfplan-tasks-") as tmp:
            T.write_task_yamls(lm_tasks, tmp)
            tm = TaskManager(include_path=tmp, include_defaults=needs_hub)
            try:
                out = simple_evaluate(model=lm, tasks=[t.lm_eval_name for t in lm_tasks], limit=limit,
                                      task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      batch_size=batch_size)
            except DfplanError:
                raise
            except Exception as e:
                hub = [t.lm_eval_name for t in lm_tasks if t.path is None]
                hint = (f"; tasks {hub} have no local file and need the network (or pass --data-dir)"
                        if hub else "")
                raise DfplanError(f"lm-eval failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}{hint}") from None
        lm_out = _clean({k: out[k] for k in ("results", "configs", "versions", "n-samples",
                                             "higher_is_better") if k in out})
        lm_out["lm_eval_version"] = _clean(out.get("lm_eval_version") or _lm_eval_version())
        result["tasks"] = _task_rows(lm_tasks, lm_out.get("results", {}))
        result["lm_eval"] = lm_out
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    result["host"] = {"loadavg": _loadavg(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "git_commit": git_commit()}
    return result


def _lm_eval_version() -> str:
    import importlib.metadata as md
    return md.version("lm_eval")


def evaluate_with_compare(model_arg: str, task_names: list[str], compare: str | None = None,
                          out: str | None = None, **kw) -> dict:
    """The model, and optionally a teacher on the same tasks and settings, in one JSON."""
    res = evaluate_tasks(model_arg, task_names, **kw)
    if compare:
        res = {"model": res, "teacher": evaluate_tasks(compare, task_names, **kw)}
    if out:
        write_json_atomic(out, res)
    return res


def summary_rows(res: dict) -> list[list]:
    """[task, metric, model, (teacher,) chance] rows for a terminal table."""
    pairs = [("model", res["model"]), ("teacher", res["teacher"])] if "teacher" in res else [("model", res)]
    first = pairs[0][1]
    rows = []
    for name, ppl in first["perplexity"].items():
        for m in ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
            rows.append([name, m] + [p[1]["perplexity"].get(name, {}).get(m) for p in pairs] + [None])
    for name, row in first["tasks"].items():
        for m, v in row.items():
            if m in ("source", "chance", "n_docs_in_file") or m.endswith("_stderr"):
                continue
            vals = []
            for _, r in pairs:
                rr = r["tasks"].get(name, {})
                se = rr.get(m + "_stderr")
                vals.append(f"{rr.get(m):.4f} ± {se:.4f}" if isinstance(se, float) and isinstance(rr.get(m), float)
                            else rr.get(m))
            rows.append([name, m] + vals + [row.get("chance") if m.startswith("acc") else None])
    return rows
