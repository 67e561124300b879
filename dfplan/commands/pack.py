"""`dfplan pack`: a packed artifact straight from a plan or layout, without distillation."""
from __future__ import annotations

import json

import click

from ._types import SEED, THREADS


@click.command(name="pack", help="Write a packed artifact from a plan or layout (no distillation).")
@click.option("--model", "model_arg", required=True,
              help="Checkpoint dir, hub id, or preset:NAME (random init from --seed).")
@click.option("--plan", "plan_arg", required=True,
              help="plan.json, or layout:NAME (see `dfplan size --help` for the layouts).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--tokenizer", default=None, help="Store this tokenizer.json (default: the model's own).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random-init and correction seed.")
@click.option("--exact-svd", is_flag=True,
              help="Accurate subspace-iteration init of corrections (slow on 1.3B) instead of svd_lowrank.")
@click.option("--threads", default=None, type=THREADS, help="torch CPU threads.")
def command(model_arg, plan_arg, out, tokenizer, seed, exact_svd, threads):
    from ..runtime.pack import pack

    if threads:
        import torch
        torch.set_num_threads(threads)
    res = pack(model_arg, plan_arg, out, tokenizer=tokenizer, seed=seed, exact_svd=exact_svd)
    click.echo(json.dumps(res, indent=1))
