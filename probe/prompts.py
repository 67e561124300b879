"""Factual prompt sets for the knowledge probe: read, convert, encode.

One format: JSON lines of {"prompt": str, "answer": str, "category": str} (other keys are
kept as metadata). ROME's known_1000.json (a JSON array of {subject, attribute, prompt,
relation_id, ...}) converts to it with category = the Wikidata relation, and to a
445-prompt, 19-category set in the DF-SSM layout (see DFSSM_LAYOUT).

The answer is the continuation of the prompt: when neither the prompt ends nor the answer
starts with whitespace, a space is put in front of the answer before tokenizing, so
"The capital of France is" + "Paris" probes the token of " Paris". Only the answer's
first token is probed (the logit lens reads one next token).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dfplan.errors import DfplanError

# Wikidata relation ids of ROME's known_1000 -> short category names.
RELATIONS = {
    "P17": "country", "P19": "birthplace", "P20": "death place", "P27": "citizenship",
    "P30": "continent", "P36": "capital", "P37": "official language", "P39": "position held",
    "P101": "field of work", "P103": "native language", "P106": "occupation", "P108": "employer",
    "P127": "owner", "P131": "admin region", "P136": "genre", "P138": "named after",
    "P140": "religion", "P159": "headquarters", "P176": "manufacturer", "P178": "developer",
    "P190": "twin city", "P276": "location", "P364": "film language", "P407": "work language",
    "P413": "sport position", "P449": "tv network", "P463": "member of", "P495": "country of origin",
    "P641": "sport", "P740": "formed in", "P937": "work location", "P1303": "instrument",
    "P1412": "language spoken",
}

# The DF-SSM analysis used 445 prompts in 19 categories (capitals 50, languages 30,
# continents 30, ..., materials 15); only those four are named in what we have of it.
# This layout keeps its size and first three categories and fills the rest from ROME
# relations: (category, relation id, count). ROME has 49 capital facts (not 50) and no
# materials relation, so the shortfall is spread over the other categories.
DFSSM_LAYOUT = (
    ("capitals", "P36", 49), ("languages", "P37", 30), ("continents", "P30", 30),
    ("countries", "P17", 25), ("citizenship", "P27", 25), ("birthplaces", "P19", 25),
    ("death places", "P20", 25), ("native languages", "P103", 25), ("developers", "P178", 25),
    ("manufacturers", "P176", 25), ("employers", "P108", 25),
    ("headquarters", "P159", 17), ("religions", "P140", 17), ("sports", "P641", 17),
    ("tv networks", "P449", 17), ("instruments", "P1303", 17), ("genres", "P136", 17),
    ("sport positions", "P413", 17), ("fields of work", "P101", 17),
)
LAYOUTS = ("all", "dfssm445")


@dataclass(frozen=True)
class Prompt:
    prompt: str
    answer: str
    category: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "answer": self.answer, "category": self.category, **self.meta}


def _check_record(rec, where: str) -> Prompt:
    if not isinstance(rec, dict):
        raise DfplanError(f"{where}: expected a JSON object with prompt, answer and category")
    missing = [k for k in ("prompt", "answer", "category") if k not in rec]
    if missing:
        raise DfplanError(f"{where}: missing {', '.join(missing)} (every line needs prompt, answer and category)")
    for k in ("prompt", "answer", "category"):
        if not isinstance(rec[k], str) or not rec[k].strip():
            raise DfplanError(f"{where}: {k} must be a non-empty string, got {rec[k]!r}")
    meta = {k: v for k, v in rec.items() if k not in ("prompt", "answer", "category")}
    return Prompt(rec["prompt"], rec["answer"], rec["category"].strip(), meta)


def read_jsonl(path: str | os.PathLike) -> list[Prompt]:
    path = Path(path)
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DfplanError(f"cannot read prompts {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DfplanError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        out.append(_check_record(rec, f"{path}:{n}"))
    return out


def convert_rome(records, where: str = "known_1000.json") -> list[Prompt]:
    """ROME known_1000 records -> prompts, category = relation name (answer = attribute)."""
    if not isinstance(records, list):
        raise DfplanError(f"{where}: expected a JSON array of ROME records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not all(k in r for k in ("prompt", "attribute", "relation_id")):
            raise DfplanError(f"{where}: record {i} lacks prompt, attribute or relation_id; "
                              "is it ROME's known_1000.json?")
        rel = str(r["relation_id"])
        meta = {"relation": rel, "subject": r.get("subject"), "id": r.get("known_id", i)}
        out.append(_check_record({"prompt": r["prompt"], "answer": r["attribute"],
                                  "category": RELATIONS.get(rel, rel), **meta}, f"{where}: record {i}"))
    return out


def dfssm_layout(prompts: list[Prompt]) -> list[Prompt]:
    """The 445-prompt, 19-category set: per DFSSM_LAYOUT row, the first `count` prompts of
    that relation in file order (known_id order for ROME), relabelled with the layout's name."""
    by_rel: dict[str, list[Prompt]] = {}
    for p in prompts:
        by_rel.setdefault(p.meta.get("relation", ""), []).append(p)
    out = []
    for name, rel, count in DFSSM_LAYOUT:
        have = by_rel.get(rel, [])
        if len(have) < count:
            raise DfplanError(f"the dfssm445 layout needs {count} prompts of relation {rel} ({name}); "
                              f"the input has {len(have)}: pass ROME's known_1000.json")
        out += [Prompt(p.prompt, p.answer, name, p.meta) for p in have[:count]]
    return out


def load_prompts(path: str | os.PathLike, layout: str = "all", limit: int | None = None) -> list[Prompt]:
    """A .jsonl prompt file or ROME's known_1000.json -> prompts (checked: >= 2 categories)."""
    path = Path(path)
    if not path.is_file():
        raise DfplanError(f"prompt file {path} does not exist")
    if layout not in LAYOUTS:
        raise DfplanError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if path.suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DfplanError(f"cannot read {path} as JSON: {e}") from None
        prompts = convert_rome(records, str(path))
    else:
        prompts = read_jsonl(path)
    if layout == "dfssm445":
        prompts = dfssm_layout(prompts)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise DfplanError(f"{path} holds no prompts")
    if len({p.category for p in prompts}) < 2:
        raise DfplanError(f"{path}: all prompts share one category; the probe compares categories, "
                          "so it needs at least two")
    return prompts


def write_jsonl(prompts: list[Prompt], path: str | os.PathLike) -> None:
    from dfplan.fileio import write_text_atomic
    write_text_atomic(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in prompts))


def continuation(prompt: str, answer: str) -> str:
    """The answer as the text that follows the prompt (a leading space unless one is there)."""
    if prompt[-1:].isspace() or answer[:1].isspace():
        return answer
    return " " + answer


def encode(prompts: list[Prompt], tokenizer, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    """-> (prompt token ids per prompt, first token id of each answer). Raises on prompts or
    answers that tokenize to nothing and on ids the model has no row for."""
    texts = [p.prompt for p in prompts]
    conts = [continuation(p.prompt, p.answer) for p in prompts]
    enc_p = tokenizer.encode_batch(texts, add_special_tokens=False)
    enc_a = tokenizer.encode_batch(conts, add_special_tokens=False)
    ids, answers = [], []
    for i, (p, ep, ea) in enumerate(zip(prompts, enc_p, enc_a)):
        if not ep.ids:
            raise DfplanError(f"prompt {i} ({p.prompt!r}) tokenizes to nothing")
        if not ea.ids:
            raise DfplanError(f"prompt {i}: answer {p.answer!r} tokenizes to nothing; "
                              "check the tokenizer matches the model")
        top = max(max(ep.ids), ea.ids[0])
        if top >= vocab_size:
            raise DfplanError(f"prompt {i} has token id {top} but the model's vocab is {vocab_size}; "
                              "use the tokenizer the model was trained with")
        ids.append(list(ep.ids))
        answers.append(ea.ids[0])
    return ids, answers
