"""`dfplan zoo`: train or list the built-in teachers."""
from __future__ import annotations

import os
import sys

import click

from ..errors import DfplanError
from ..runfolder import check_corpus, check_out_dir, is_temp_leftover
from ._types import SEED, THREADS

# what a teacher run writes into its folder (anything else there belongs to someone else)
_TEACHER_FILES = {"zoo.json", "checkpoint.pt", "config.json", "tokenizer.json", "model.safetensors",
                  "pytorch_model.bin", "train_log.jsonl", "dfplan_extra.json"}


def _info(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(name="zoo", help="Train or list built-in teacher models.")
def command():
    pass


@command.command(name="train", help="Train a small Mamba-2 teacher on CPU and save it in mamba_ssm format.")
@click.option("--preset", default="tiny", show_default=True, help="Teacher preset: tiny or small.")
@click.option("--corpus", multiple=True, default=("builtin",), show_default=True,
              help="Text file, folder, glob or 'builtin' (repeatable).")
@click.option("--glob", "glob_", default="*.txt", show_default=True, help="File pattern inside corpus folders.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the teacher.")
@click.option("--tokenizer", default=None, help="Use this tokenizer.json / hub id instead of training a BPE.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps [preset default].")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Training window length [preset default].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Windows per step [preset default].")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate [preset default].")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warmup steps [10% of steps, at most 100].")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Validate every N steps [steps/5].")
@click.option("--ckpt-every", type=click.IntRange(min=1), default=None, help="Checkpoint every N steps [= --eval-every].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--threads", type=THREADS, default=None, help="torch CPU threads [torch default].")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--force", is_flag=True, help="Train into a non-empty --out that holds no teacher run.")
def train(preset, corpus, glob_, out, tokenizer, steps, seq_len, batch_size, lr, warmup, eval_every,
          ckpt_every, seed, threads, resume, force):
    outp = check_out_dir(out)                 # before torch: bad paths fail in a fraction of a second
    check_corpus(corpus)
    foreign = [n for n in (os.listdir(outp) if outp.is_dir() else ()) if n not in _TEACHER_FILES
               and not is_temp_leftover(n)]
    if foreign and not force:
        raise DfplanError(f"--out {out} is not empty and holds no teacher run (it holds {foreign[0]}); "
                          "choose an empty folder or pass --force")
    if sys.stderr.isatty():    # at once: torch and the tokenizer take seconds
        _info(f"zoo: training the {preset} teacher into {out} (tokenizer first, then the steps)")
    from ..zoo import TrainConfig, train_teacher
    tc = TrainConfig(out=out, preset=preset, corpus=tuple(corpus), glob=glob_, tokenizer=tokenizer,
                     steps=steps, seq_len=seq_len, batch_size=batch_size, lr=lr, warmup=warmup,
                     eval_every=eval_every, ckpt_every=ckpt_every, seed=seed, threads=threads,
                     resume=resume)
    meta = train_teacher(tc, say=_info)
    click.echo(f"{out}: val ppl {meta['val_ppl']} (unigram {meta['unigram_ppl']}), "
               f"{meta['tokens_seen']:,} tokens, {meta['tokens_per_s']:,.0f} tok/s")


@command.command(name="list", help="Show teacher presets and trained teachers under a folder.")
@click.option("--dir", "root", default="runs", show_default=True, type=click.Path(file_okay=False),
              help="Folder searched recursively for trained teachers (zoo.json).")
def list_(root):
    if root != "runs" and not os.path.isdir(root):      # the default may simply not exist yet
        raise DfplanError(f"--dir {root!r} is not a folder")
    from tabulate import tabulate

    from ..zoo import find_teachers, preset_rows
    click.echo(tabulate(preset_rows(), headers="keys", intfmt=","))
    found = find_teachers(root)
    click.echo("")
    if not found:
        click.echo(f"no trained teachers under {root}")
        return
    rows = [{"path": t.path, "preset": t.preset, "steps": t.steps, "tokens": t.tokens_seen,
             "val_ppl": t.val_ppl, "unigram_ppl": t.unigram_ppl} for t in found]
    click.echo(tabulate(rows, headers="keys", intfmt=","))
