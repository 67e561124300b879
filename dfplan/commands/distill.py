"""`dfplan distill`: teacher + plan + corpus -> packed, verified DF-SSM student (+ eval.json).

Data-parallel: launch the same command with torchrun (e.g. `torchrun --nproc-per-node 2
-m dfplan.cli distill ...`); every process takes its shard of each global batch.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import DfplanError
from ..runfolder import check_corpus, check_model_arg, check_out_dir, check_same_model
from ..sizes import parse_count
from ._types import SEED, THREADS


def _info(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(name="distill", help="Distill a plan into a packed DF-SSM student.")
@click.option("--teacher", required=True, help="FP teacher: checkpoint folder or hub id.")
@click.option("--plan", "plan_arg", required=True, help="plan.json, or layout:NAME (e.g. layout:dfssm).")
@click.option("--corpus", multiple=True, required=True, help="Training text: file, folder, glob or 'builtin' (repeatable).")
@click.option("--tokens", required=True, help="Training tokens over both stages, e.g. 2M, 500k.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder for the packed student.")
@click.option("--glob", "glob_", default="*.txt", show_default=True, help="File pattern inside corpus folders.")
@click.option("--tokenizer", default=None, help="tokenizer.json when the teacher ships none.")
@click.option("--seq-len", default=512, show_default=True, type=click.IntRange(min=2))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Windows per step over all processes.")
@click.option("--stage1-fraction", type=click.FloatRange(0, 1), default=0.38, show_default=True,
              help="Share of the tokens for stage 1 (annealing the latent weights).")
@click.option("--anneal-fraction", type=click.FloatRange(0, 1), default=0.8, show_default=True,
              help="Share of stage 1 over which a rises 0 -> 1.")
@click.option("--final-fraction", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Share of stage 2 trained with integer corrections in the forward.")
@click.option("--lr-latent", type=click.FloatRange(0, min_open=True), default=3e-4, show_default=True,
              help="Latent weights (stage 1; IntN units throughout).")
@click.option("--lr-correction", type=click.FloatRange(0, min_open=True), default=3e-3, show_default=True, help="Low-rank U, V.")
@click.option("--lr-scale", type=click.FloatRange(0, min_open=True), default=3e-4, show_default=True, help="Binary row / FBI scales.")
@click.option("--lr-norm", type=click.FloatRange(0, min_open=True), default=3e-4, show_default=True, help="RMSNorm weights (--train-norms).")
@click.option("--correction-from", type=click.Choice(["latent", "teacher"]), default="latent", show_default=True,
              help="Stage-2 corrections start from the residual of the annealed latent or of the teacher.")
@click.option("--kl-weight", type=click.FloatRange(0), default=0.7, show_default=True)
@click.option("--ce-weight", type=click.FloatRange(0), default=0.3, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=2.0, show_default=True)
@click.option("--train-norms", is_flag=True, help="Also train the RMSNorm weights (frozen by default).")
@click.option("--checkpoint-every", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-corpus", multiple=True, help="Held-out text for eval.json [valid split of --corpus].")
@click.option("--eval-windows", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-seq-len", default=None, type=click.IntRange(min=2), help="[--seq-len]")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [cpu].")
@click.option("--threads", default=None, type=THREADS, help="torch CPU threads per process.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
def command(teacher, plan_arg, corpus, tokens, out, glob_, tokenizer, seq_len, batch_size, stage1_fraction,
            anneal_fraction, final_fraction, lr_latent, lr_correction, lr_scale, lr_norm, correction_from, kl_weight,
            ce_weight, temperature, train_norms, checkpoint_every, eval_corpus, eval_windows, eval_seq_len,
            seed, device, threads, resume):
    # checked before torch is imported or the teacher loaded
    check_model_arg(teacher, "--teacher")
    if not plan_arg.startswith("layout:") and not Path(plan_arg).is_file():
        raise DfplanError(f"--plan {plan_arg!r} is neither a plan.json file nor layout:NAME")
    parse_count(tokens)
    check_corpus(corpus)
    check_corpus(eval_corpus, "--eval-corpus")
    outp = check_out_dir(out)
    check_same_model(outp.parent, teacher)
    from ..distill.losses import LossConfig
    from ..distill.run import DistillJob, run_distill
    from ..distill.trainer import DistillConfig
    from ..distributed import init_from_env

    cfg = DistillConfig(tokens=parse_count(tokens), seq_len=seq_len, batch_size=batch_size,
                        stage1_fraction=stage1_fraction, anneal_fraction=anneal_fraction,
                        final_fraction=final_fraction, lr_latent=lr_latent, lr_correction=lr_correction,
                        lr_scale=lr_scale, lr_norm=lr_norm, correction_from=correction_from,
                        loss=LossConfig(kl_weight, ce_weight, temperature), train_norms=train_norms,
                        checkpoint_every=checkpoint_every, seed=seed)
    job = DistillJob(teacher=teacher, plan=plan_arg, corpus=tuple(corpus), out=out, config=cfg, glob=glob_,
                     tokenizer=tokenizer, eval_corpus=tuple(eval_corpus), eval_windows=eval_windows,
                     eval_seq_len=eval_seq_len, resume=resume, device=device, threads=threads)
    created = init_from_env(device)
    try:
        ev = run_distill(job, say=_info)
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if ev is not None:
        click.echo(f"{out}: student ppl {ev['student']['ppl']:.3f} (teacher {ev['teacher']['ppl']:.3f}, "
                   f"untrained plan {ev['ptq']['ppl']:.3f}), KL {ev['student']['kl_to_teacher']:.4f}, "
                   f"{ev['compression']:.2f}x smaller than fp16")
