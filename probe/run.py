"""`dfplan probe`: prompts + teacher [+ student] -> per-depth tables, phases, figure.

Files written into the run directory (all computed first, then written atomically):
  probe.json          summary: settings, phases, disturbance ranking, how many facts are known
  probe_layers.csv    one row per model x depth (layer -1 = embedding)
  probe_swap.csv      per block: the answer's final log-prob drop / top-k loss / KL when only
                      that block is the student's (with --compare)
  probe_prompts.csv   per prompt: answer token, final rank, first depth in the top-k
  probe_prompts.jsonl the exact prompt set used (e.g. the converted ROME set)
  probe.png           layer x metric figure, phases shaded
  probe.md            the tables as markdown, for a report
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from dfplan.errors import DfplanError
from dfplan.fileio import write_json_atomic, write_text_atomic
from dfplan.loading import load_any
from dfplan.provenance import git_commit
from dfplan.tokenizer import check_vocab, fingerprint, load_tokenizer

from .collect import Readout, check_compatible, read_model, read_swaps
from .metrics import first_entry, layer_table
from .phases import Phases, detect_phases, disturbance, phase_of
from .plot import probe_figure
from .prompts import encode, load_prompts, write_jsonl


@dataclass(frozen=True)
class ProbeOptions:
    model: str
    prompts: str
    out: str = "runs/probe"
    compare: str | None = None
    tokenizer: str | None = None
    layout: str = "all"
    limit: int | None = None
    top_k: int = 10
    folds: int = 5
    batch_size: int = 16
    swap: bool = True
    device: str = "cpu"
    seed: int = 0
    progress: bool = True


def _load(model_arg: str, device: str):
    model, tok = load_any(model_arg, device=device)
    return model.to(device).eval(), tok


def _model_summary(name: str, arg: str, rd: Readout, rows: list[dict], ph: Phases, k: int) -> dict:
    fin = rd.rank[-1]
    return {"name": name, "model": arg, "n_layer": rd.n_layer,
            "final_top1": float((fin == 0).double().mean()), f"final_top{k}": float((fin < k).double().mean()),
            "known_top1": int((fin == 0).sum()),
            "phases": ph.to_json(),
            "peak_category_accuracy": max(r["category_accuracy"] for r in rows[1:]),
            "peak_category_accuracy_block": max(rows[1:], key=lambda r: r["category_accuracy"])["layer"],
            "embedding_category_accuracy": rows[0]["category_accuracy"]}


def _analyse(rd: Readout, labels: torch.Tensor, o: ProbeOptions, chance: float):
    rows = layer_table(rd.states, rd.rank, rd.logprob, labels, o.top_k, o.folds, o.seed)
    blocks = rows[1:]                                            # phases live on blocks, not the embedding
    ph = detect_phases([r["category_accuracy"] for r in blocks], [r[f"top{o.top_k}_rate"] for r in blocks], chance)
    for r in rows:
        r["phase"] = phase_of(r["layer"], ph) if r["layer"] >= 0 else "embedding"
    return rows, ph


def _first_layer(rd: Readout, k: int) -> list:
    """Per prompt: the layer (-1 = embedding) where the answer first enters the top-k, or None."""
    return [None if d < 0 else d - 1 for d in first_entry(rd.rank, k).tolist()]


def export_prompts(prompts_path: str, out: str, layout: str = "all", limit: int | None = None) -> int:
    """Write the (converted) prompt set as jsonl; returns how many prompts."""
    prompts = load_prompts(prompts_path, layout, limit)
    write_jsonl(prompts, out)
    return len(prompts)


def _tokenizer(o: ProbeOptions, tok, cfg):
    if o.tokenizer:
        tok = load_tokenizer(o.tokenizer)
    if tok is None:
        raise DfplanError(f"{o.model} ships no tokenizer.json; pass --tokenizer")
    check_vocab(tok, cfg)
    return tok


def _markdown(summary: dict, layer_df: pd.DataFrame, swap_df: pd.DataFrame | None) -> str:
    k = summary["top_k"]
    lines = [f"# Knowledge probe: {summary['prompts']['n']} prompts, {summary['prompts']['categories']} categories",
             "", f"Prompts: `{summary['prompts']['path']}` (layout {summary['prompts']['layout']}); "
             f"chance category accuracy {summary['chance']:.3f}; lens top-{k}.", ""]
    for m in summary["models"]:
        ph = m["phases"]
        lines += [f"**{m['name']}** (`{m['model']}`): answer top-1 at the output for {m['known_top1']} prompts "
                  f"({m['final_top1']:.1%}), top-{k} {m[f'final_top{k}']:.1%}; phases: categorisation "
                  f"{ph['categorisation']}, recall {ph['recall']}, formatting {ph['formatting']}.", ""]
        lines += [f"- {n}" for n in ph["notes"]] + ([""] if ph["notes"] else [])
    cols = ["model", "layer", "phase", "category_accuracy", "category_separation", f"top{k}_rate",
            "answer_prob", "median_rank", f"first_top{k}"]
    lines += [layer_df[cols].to_markdown(index=False, floatfmt=".4g"), ""]
    if swap_df is not None:
        lines += ["Only block i compressed (the student's), everything else the teacher's:", "",
                  swap_df.to_markdown(index=False, floatfmt=".4g"), ""]
    lines += ["![probe](probe.png)", ""]
    return "\n".join(lines)


def run_probe(o: ProbeOptions) -> dict:
    t0 = time.time()
    prompts = load_prompts(o.prompts, o.layout, o.limit)
    cats = sorted({p.category for p in prompts})
    labels = torch.tensor([cats.index(p.category) for p in prompts])
    chance = 1.0 / len(cats)
    teacher, tok = _load(o.model, o.device)
    tok = _tokenizer(o, tok, teacher.config)
    ids, answers = encode(prompts, tok, teacher.config.vocab_size)
    V = teacher.config.vocab_size
    rd_t = read_model(teacher, ids, answers, V, o.batch_size, "teacher", o.progress)
    rows_t, ph_t = _analyse(rd_t, labels, o, chance)
    models = [_model_summary("teacher", o.model, rd_t, rows_t, ph_t, o.top_k)]
    for r in rows_t:
        r["model"] = "teacher"
    all_rows, swap_df, rd_s, ranking = list(rows_t), None, None, None
    if o.compare:
        student, stok = _load(o.compare, o.device)
        check_compatible(teacher, student)
        if stok is not None and fingerprint(stok) != fingerprint(tok):
            raise DfplanError(f"{o.compare} ships a different tokenizer than the teacher")
        rd_s = read_model(student, ids, answers, V, o.batch_size, "student", o.progress)
        rows_s, ph_s = _analyse(rd_s, labels, o, chance)
        cos = torch.nn.functional.cosine_similarity(rd_t.states, rd_s.states, dim=-1).mean(1)   # (S,)
        for r, c in zip(rows_s, cos.tolist()):
            r["model"], r["cos_to_teacher"] = "student", c
        all_rows += rows_s
        models.append(_model_summary("student", o.compare, rd_s, rows_s, ph_s, o.top_k))
        if o.swap:
            sw = read_swaps(teacher, student, ids, answers, V, o.batch_size, o.progress)
            drop = (sw.base_logprob[None] - sw.logprob).mean(1).tolist()
            kl = sw.kl.mean(1).tolist()
            lost = ((sw.base_rank[None] < o.top_k) & (sw.rank >= o.top_k)).double().mean(1).tolist()
            swap_df = pd.DataFrame({"block": range(len(drop)), "logprob_drop": drop, "kl": kl,
                                    f"top{o.top_k}_lost": lost,
                                    "phase": [phase_of(i, ph_t) for i in range(len(drop))]})
            ranking = disturbance(drop, kl, ph_t)
    layer_df = pd.DataFrame(all_rows)
    layer_df = layer_df[["model"] + [c for c in layer_df.columns if c != "model"]]

    prompt_df = pd.DataFrame({"category": [p.category for p in prompts], "prompt": [p.prompt for p in prompts],
                              "answer": [p.answer for p in prompts], "answer_token": answers,
                              "answer_text": [tok.decode([a]) for a in answers],
                              "teacher_final_rank": rd_t.rank[-1].tolist(),
                              "teacher_top1_text": [tok.decode([int(t)]) for t in rd_t.top1[-1]],
                              f"teacher_first_top{o.top_k}": _first_layer(rd_t, o.top_k)})
    if rd_s is not None:
        prompt_df["student_final_rank"] = rd_s.rank[-1].tolist()
        prompt_df[f"student_first_top{o.top_k}"] = _first_layer(rd_s, o.top_k)

    psrc = Path(o.prompts)
    summary = {
        "prompts": {"path": str(psrc), "sha256": hashlib.sha256(psrc.read_bytes()).hexdigest(),
                    "layout": o.layout, "n": len(prompts), "categories": len(cats),
                    "per_category": {c: int((labels == i).sum()) for i, c in enumerate(cats)}},
        "top_k": o.top_k, "folds": o.folds, "seed": o.seed, "chance": chance,
        "models": models, "recall_disturbance": ranking,
        "depth_convention": "layer -1 = embedding output; layer i = residual stream after block i",
        "git_commit": git_commit(mark_dirty=True), "wall_s": round(time.time() - t0, 2),
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "options": asdict(o),
    }
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(o.model).name}" + (f" vs {Path(o.compare).name}" if o.compare else "")
    probe_figure(out / "probe.png", rows_t, models[0]["phases"], o.top_k, chance,
                 all_rows[len(rows_t):] or None, models[1]["phases"] if o.compare else None,
                 swap_df.to_dict("records") if swap_df is not None else None, title)
    write_text_atomic(out / "probe_layers.csv", layer_df.to_csv(index=False, float_format="%.6g"))
    if swap_df is not None:
        write_text_atomic(out / "probe_swap.csv", swap_df.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / "probe_prompts.csv", prompt_df.to_csv(index=False))
    write_jsonl(prompts, out / "probe_prompts.jsonl")
    write_text_atomic(out / "probe.md", _markdown(summary, layer_df, swap_df))
    write_json_atomic(out / "probe.json", summary)
    return summary
