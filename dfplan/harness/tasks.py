"""The evaluation tasks `dfplan eval --tasks` knows, and lm-eval task YAMLs made at run time
from local jsonl files, so the zero-shot suite runs with the network off.

Each local set is checked line by line before lm-eval sees it (a malformed line names the
file and the line). The prompts follow lm-eval's own task YAMLs where the local format
allows ("Question: ...\nAnswer:" + " " + choice, " " + last word for LAMBADA, partial
scoring for WinoGrande). Tasks without a local file fall back to lm-eval's hub task of the
same meaning (needs the network); `hub:NAME` asks for any lm-eval task by its own name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DfplanError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str                 # "ppl" | "mc" | "partial" | "cloze"
    files: tuple[str, ...]    # candidate paths relative to the data dir (first found wins)
    hub: str | None           # lm-eval's task of the same meaning (network)
    prompt: str = "{{query}}"  # mc: doc_to_text
    ppl_format: str = ""      # ppl: "wikitext" | "ptb"
    note: str = ""


FOUNDRY = "llm_foundry_gauntlet"
_QA = "{{query | trim}}\nAnswer:"
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("wikitext2", "ppl", ("wikitext-2-raw-v1/test.rows.jsonl", "../corpora/wikitext-2-raw-v1/test.rows.jsonl"),
             "wikitext", ppl_format="wikitext", note='WikiText-2 raw test rows joined with "\\n\\n"'),
    TaskSpec("ptb", "ppl", ("ptb/ptb.test.txt", "../corpora/ptb/ptb.test.txt"), None, ppl_format="ptb",
             note='PTB test sentences joined with " "'),
    TaskSpec("lambada", "cloze", (f"{FOUNDRY}/lambada_openai.jsonl", "lambada_openai.jsonl"), "lambada_openai"),
    TaskSpec("piqa", "mc", (f"{FOUNDRY}/piqa.jsonl", "piqa.jsonl"), "piqa", _QA),
    TaskSpec("arc_easy", "mc", (f"{FOUNDRY}/arc_easy.jsonl", "arc_easy.jsonl"), "arc_easy", _QA),
    TaskSpec("arc_challenge", "mc", (f"{FOUNDRY}/arc_challenge.jsonl", "arc_challenge.jsonl"),
             "arc_challenge", _QA),
    TaskSpec("hellaswag", "mc", ("hellaswag/hellaswag_val.jsonl", "hellaswag_val.jsonl"), "hellaswag"),
    TaskSpec("winogrande", "partial", (f"{FOUNDRY}/winogrande.jsonl", "winogrande.jsonl"), "winogrande"),
    TaskSpec("boolq", "mc", (f"{FOUNDRY}/boolq.jsonl", "boolq.jsonl"), "boolq", "{{query}}\nAnswer:"),
)}
DEFAULT_TASKS = tuple(TASKS)
LOCAL_PREFIX = "dfplan_"      # our generated task names never shadow lm-eval's own
HUB_PREFIX = "hub:"


@dataclass(frozen=True)
class ResolvedTask:
    name: str                 # as the user wrote it
    spec: TaskSpec | None     # None for hub:NAME
    path: Path | None         # local data file, or None (hub)
    lm_eval_name: str | None  # task name lm-eval runs (None for perplexity sets)
    chance: float | None = None
    n_docs: int | None = None


def default_data_dir() -> Path | None:
    for cand in (Path("../shared/data/eval"), Path(__file__).resolve().parents[3] / "shared/data/eval"):
        if cand.is_dir():
            return cand
    return None


def local_tasks(data_dir: str | Path | None) -> list[str]:
    """Known tasks whose data file is present (what `--tasks all` runs)."""
    d = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if d is None:
        return []
    return [n for n, s in TASKS.items() if any((d / f).is_file() for f in s.files)]


def resolve(names: list[str], data_dir: str | Path | None, limit: int | None = None) -> list[ResolvedTask]:
    """Task names -> local files (checked) or hub tasks; unknown names list the known ones."""
    d = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise DfplanError(f"--data-dir {data_dir} is not a directory")
    out, seen = [], set()
    for raw in names:
        name = raw.strip()
        if not name or name in seen:
            continue
        seen.add(name)
        if name.startswith(HUB_PREFIX):
            hub = name[len(HUB_PREFIX):]
            if not hub:
                raise DfplanError("hub: needs an lm-eval task name, e.g. hub:arc_challenge")
            out.append(ResolvedTask(name, None, None, hub))
            continue
        spec = TASKS.get(name)
        if spec is None:
            raise DfplanError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                              f"(or hub:NAME for any lm-eval task, which needs the network)")
        path = next(((d / f).resolve() for f in spec.files if d is not None and (d / f).is_file()), None)
        if path is None:
            if spec.hub is None:
                where = ", ".join(str(d / f) for f in spec.files) if d else "(no data dir)"
                raise DfplanError(f"task {name}: no local file ({where}) and lm-eval has no hub task for it; "
                                  "pass --data-dir")
            out.append(ResolvedTask(name, spec, None, spec.hub))
            continue
        if spec.kind == "ppl":
            out.append(ResolvedTask(name, spec, path, None))
            continue
        chance, n = check_file(spec, path, limit)
        out.append(ResolvedTask(name, spec, path, LOCAL_PREFIX + name, chance, n))
    if not out:
        raise DfplanError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    return out


_SCHEMAS = {
    "mc": {"query": str, "choices": list, "gold": int},
    "partial": {"context_options": list, "continuation": str, "gold": int},
    "cloze": {"context": str, "continuation": str},
}


def check_file(spec: TaskSpec, path: Path, limit: int | None = None) -> tuple[float | None, int]:
    """Validate every line of a local jsonl set; -> (chance accuracy over the first `limit`
    examples, the ones evaluated; number of examples in the file)."""
    schema = _SCHEMAS[spec.kind]
    n, inv, n_chance = 0, 0.0, 0
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DfplanError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise DfplanError(f"{where}: not JSON ({e.msg}); {spec.name} expects one object a line "
                                  f"with keys {sorted(schema)}") from None
            if not isinstance(doc, dict):
                raise DfplanError(f"{where}: expected a JSON object with keys {sorted(schema)}")
            for key, typ in schema.items():
                v = doc.get(key)
                if not isinstance(v, typ) or isinstance(v, bool):
                    raise DfplanError(f"{where}: {spec.name} expects {key!r} as {typ.__name__}, "
                                      f"got {type(v).__name__ if key in doc else 'nothing'}")
            opts = doc.get("choices", doc.get("context_options"))
            if opts is not None:
                if len(opts) < 2 or not all(isinstance(c, str) and c for c in opts):
                    raise DfplanError(f"{where}: choices must be at least two non-empty strings")
                if not 0 <= doc["gold"] < len(opts):
                    raise DfplanError(f"{where}: gold {doc['gold']} is not an index into {len(opts)} choices")
                if limit is None or n < limit:
                    inv += 1.0 / len(opts)
                    n_chance += 1
            elif not doc["continuation"].strip():
                raise DfplanError(f"{where}: empty continuation")
            n += 1
    if n == 0:
        raise DfplanError(f"{path} holds no examples")
    return (inv / n_chance if spec.kind != "cloze" else None), n


def task_yaml(task: ResolvedTask, hf_cache: Path) -> dict:
    """lm-eval task config for a local set (json loader, single 'test' split)."""
    spec = task.spec
    base = {"task": task.lm_eval_name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(task.path.resolve())}, "cache_dir": str(hf_cache)},
            "test_split": "test", "metadata": {"version": 1.0, "source": str(task.path)}}
    mc_metrics = [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                  for m in ("acc", "acc_norm", "acc_bytes")]
    if spec.kind == "mc":
        base.update(output_type="multiple_choice", doc_to_text=spec.prompt, doc_to_target="gold",
                    doc_to_choice="choices", metric_list=mc_metrics)
    elif spec.kind == "partial":
        # doc_to_text returning the gold index makes lm-eval score the shared continuation
        # after each context option (WinoGrande partial scoring)
        base.update(output_type="multiple_choice", doc_to_text="gold", doc_to_target="continuation",
                    doc_to_choice="context_options", metric_list=mc_metrics[:1])
    elif spec.kind == "cloze":
        base.update(output_type="loglikelihood", doc_to_text="{{context}}",
                    doc_to_target="{{' ' + continuation}}",
                    metric_list=[{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                 {"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        raise ValueError(spec.kind)
    return base


def write_task_yamls(tasks: list[ResolvedTask], out_dir: str | Path) -> Path:
    """One <name>.yaml per local lm-eval task under out_dir (usable with lm_eval --include_path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        if t.spec is not None and t.path is not None and t.lm_eval_name:
            cfg = task_yaml(t, out / "hf_cache")
            (out / f"{t.lm_eval_name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return out


def text_perplexity_yaml(task_name: str, data_file: Path, hf_cache: Path) -> dict:
    """A loglikelihood_rolling task over a jsonl of {"text": ...} documents with lm-eval's
    word/byte perplexity metrics (the same definitions as its wikitext task)."""
    return {"task": task_name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(hf_cache)},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            "metadata": {"version": 1.0}}
