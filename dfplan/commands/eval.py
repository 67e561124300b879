"""`dfplan eval`: held-out perplexity (and KL to a teacher) of a checkpoint or packed artifact;
with --tasks, standard-protocol perplexity and lm-eval zero-shot tasks instead."""
from __future__ import annotations

import json

import click

from ..runfolder import check_corpus, check_model_arg, check_out_dir, check_result_file


@click.command(name="eval", help="Perplexity and zero-shot accuracy of a model or packed artifact. "
               "Without --tasks: held-out perplexity on --corpus (and KL to --teacher). With --tasks: "
               "WikiText-2/PTB perplexity by the standard protocol and lm-eval zero-shot tasks.")
@click.option("--model", "model_arg", required=True, help="Checkpoint dir, packed artifact dir or hub id.")
@click.option("--corpus", multiple=True, help="Held-out text: file, folder, glob or 'builtin' (without --tasks).")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--teacher", default=None, help="FP teacher checkpoint: also report KL(teacher || model).")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=2))
@click.option("--windows", default=64, show_default=True, type=click.IntRange(min=1),
              help="At most this many evenly spaced non-overlapping windows.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--tasks", default=None,
              help="Comma list: wikitext2,ptb,lambada,piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq, "
                   "'all' (every task with a local file), or hub:NAME for any lm-eval task (network).")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="Local evaluation sets (default: ../shared/data/eval when present).")
@click.option("--limit", default=None, type=click.IntRange(min=1),
              help="First N examples per task (first N rows/lines of a perplexity set).")
@click.option("--max-length", default=None, type=click.IntRange(min=2),
              help="Evaluation context in tokens (default: the trained context when known, else 2048).")
@click.option("--stride", default=None, type=click.IntRange(min=1),
              help="Perplexity: new tokens scored per window (default: --max-length, disjoint windows).")
@click.option("--compare", default=None, help="Also evaluate this teacher on the same tasks, side by side.")
@click.option("--bootstrap-iters", default=1000, show_default=True, type=click.IntRange(min=0),
              help="lm-eval bootstrap resamples for stderrs without a closed form (perplexity).")
@click.option("--write-tasks", default=None, type=click.Path(file_okay=False),
              help="Only write the local tasks' lm-eval YAMLs here (for lm_eval --include_path).")
@click.option("--force", is_flag=True, help="Write --out even if it is a file that is not a dfplan result.")
def command(model_arg, corpus, tokenizer, teacher, seq_len, windows, batch_size, out, tasks, data_dir,
            limit, max_length, stride, compare, bootstrap_iters, write_tasks, force):
    from ..errors import DfplanError
    check_model_arg(model_arg)                # before torch: a typo costs a fraction of a second
    for flag, v in (("--teacher", teacher), ("--compare", compare)):
        if v is not None:
            check_model_arg(v, flag)
    if out is not None:
        check_result_file(out, force=force)
    check_corpus(corpus)
    if write_tasks is not None:
        check_out_dir(write_tasks, "--write-tasks")
    if tasks is None and write_tasks is None:
        if not corpus:
            raise DfplanError("pass --corpus (held-out perplexity) or --tasks (standard tasks)")
        from ..evaluate import evaluate_model
        res = evaluate_model(model_arg, list(corpus), tokenizer=tokenizer, teacher=teacher, seq_len=seq_len,
                             max_windows=windows, batch_size=batch_size, out=out)
        click.echo(json.dumps(res, indent=2))
        return
    if corpus or teacher:
        raise DfplanError("--corpus and --teacher belong to held-out perplexity (without --tasks); "
                          "with --tasks use --compare TEACHER")
    from ..harness import tasks as T
    names = T.local_tasks(data_dir) if tasks in (None, "all") else tasks.split(",")
    if write_tasks is not None:
        local = [t for t in T.resolve(names, data_dir) if t.path is not None and t.lm_eval_name]
        T.write_task_yamls(local, write_tasks)
        click.echo(f"wrote lm-eval task YAMLs to {write_tasks}; run them with "
                   f"python -m dfplan.harness --model dfplan --model_args pretrained={model_arg} "
                   f"--include_path {write_tasks} --tasks {','.join(t.lm_eval_name for t in local)}")
        return
    from tabulate import tabulate

    from ..harness.run import evaluate_with_compare, summary_rows
    res = evaluate_with_compare(model_arg, names, compare=compare, out=out, data_dir=data_dir, limit=limit,
                                batch_size=batch_size, max_length=max_length, stride=stride, tokenizer=tokenizer,
                                bootstrap_iters=bootstrap_iters)
    head = ["task", "metric", "model"] + (["teacher"] if compare else []) + ["chance"]
    click.echo(tabulate(summary_rows(res), headers=head, floatfmt=".4f"))
    if out:
        click.echo(f"wrote {out}")
