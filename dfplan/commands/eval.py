"""`dfplan eval`: held-out perplexity (and KL to a teacher) of a checkpoint or packed artifact."""
from __future__ import annotations

import json

import click


@click.command(name="eval", help="Held-out perplexity (and KL to a teacher) of a model or packed artifact.")
@click.option("--model", "model_arg", required=True, help="Checkpoint dir, packed artifact dir or hub id.")
@click.option("--corpus", multiple=True, required=True, help="Held-out text: file, folder, glob or 'builtin'.")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--teacher", default=None, help="FP teacher checkpoint: also report KL(teacher || model).")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2))
@click.option("--windows", default=64, show_default=True, type=click.IntRange(min=1),
              help="At most this many evenly spaced non-overlapping windows.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
def command(model_arg, corpus, tokenizer, teacher, seq_len, windows, batch_size, out):
    from ..evaluate import evaluate_model
    res = evaluate_model(model_arg, list(corpus), tokenizer=tokenizer, teacher=teacher, seq_len=seq_len,
                         max_windows=windows, batch_size=batch_size, out=out)
    click.echo(json.dumps(res, indent=2))
