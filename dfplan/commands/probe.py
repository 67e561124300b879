"""`dfplan probe`: where a model categorises, recalls and formats facts, and what compression moves."""
from __future__ import annotations

import json

import click

from ..errors import DfplanError


@click.command(name="probe", help="Knowledge-organisation probe across depth (logit lens + category geometry).\n\n\b\n"
               "  dfplan probe --model runs/teacher --prompts known_1000.json --out runs/probe\n"
               "  dfplan probe --model T --compare runs/student --prompts known_1000.json --layout dfssm445\n"
               "  dfplan probe --prompts known_1000.json --layout dfssm445 --write-prompts set445.jsonl")
@click.option("--model", "model_arg", default=None, help="Teacher: checkpoint dir, packed artifact dir or hub id.")
@click.option("--prompts", required=True, help="jsonl of {prompt, answer, category}, or ROME's known_1000.json.")
@click.option("--compare", default=None, help="Student (packed artifact or checkpoint dir) compressed from --model.")
@click.option("--out", default="runs/probe", show_default=True, type=click.Path(file_okay=False),
              help="Run directory for probe.json, probe_*.csv, probe.png, probe.md.")
@click.option("--layout", type=click.Choice(["all", "dfssm445"]), default="all", show_default=True,
              help="all: every prompt; dfssm445: the 445-prompt, 19-category DF-SSM-style set (ROME input).")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--top-k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Recall = the answer's first token among the lens's top k.")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(min=2),
              help="Cross-validation folds of the nearest-centroid classifier.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Only the first N prompts.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--swap/--no-swap", default=True, show_default=True,
              help="With --compare: also score the teacher with one block at a time the student's.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--seed", default=0, show_default=True, type=int, help="Fold assignment seed.")
@click.option("--write-prompts", default=None, type=click.Path(dir_okay=False),
              help="Only write the (converted) prompt set as jsonl here, then stop (no model needed).")
def command(model_arg, prompts, compare, out, layout, tokenizer, top_k, folds, limit, batch_size, swap, device,
            threads, seed, write_prompts):
    from ..probe import ProbeOptions, export_prompts, run_probe
    if write_prompts:
        n = export_prompts(prompts, write_prompts, layout, limit)
        click.echo(f"wrote {n} prompts to {write_prompts}")
        return
    if not model_arg:
        raise DfplanError("dfplan probe needs --model (or --write-prompts to only convert the prompts)")
    if threads:
        import torch
        torch.set_num_threads(threads)
    s = run_probe(ProbeOptions(model=model_arg, prompts=prompts, out=out, compare=compare, tokenizer=tokenizer,
                               layout=layout, limit=limit, top_k=top_k, folds=folds, batch_size=batch_size,
                               swap=swap, device=device, seed=seed))
    brief = {"out": out, "prompts": s["prompts"]["n"], "categories": s["prompts"]["categories"],
             "models": [{k: m[k] for k in ("name", "final_top1", f"final_top{top_k}", "phases")} for m in s["models"]],
             "recall_disturbance": s["recall_disturbance"]}
    click.echo(json.dumps(brief, indent=2))
