"""`dfplan sensitivity` (score every unit x candidate format) and `dfplan sensitivity validate`."""
from __future__ import annotations

import click

from ..errors import DfplanError
from ..project import default
from ..runfolder import check_corpus, check_model_arg, check_out_file, claim_if_run_folder, record_run
from ._types import SEED, THREADS


def _top_k(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DfplanError(f"--top-k {text!r} must be comma-separated integers such as 2,4,8") from None
    if not ks or min(ks) < 1:
        raise DfplanError(f"--top-k {text!r} must list positive integers")
    return ks


@click.group(name="sensitivity", invoke_without_command=True,
             help="Per-layer KL sensitivity of every candidate format (forward-only).\n\n\b\n"
                  "  dfplan sensitivity --model M --corpus C --out run/sensitivity.csv\n"
                  "  dfplan sensitivity validate --model M --corpus C --table run/sensitivity.csv")
@click.option("--model", "model_arg", default=None, help="Teacher checkpoint dir, hub id or preset:NAME (with --random-init).")
@click.option("--corpus", multiple=True, help="Calibration text: file, folder, glob or 'builtin' (repeatable).")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--candidates", default="default", show_default=True,
              help="'default' (bin, bin+r8..r128, int2/3/4/8, fp16) or a comma list of format names.")
@click.option("--windows", default=32, show_default=True, type=click.IntRange(min=1), help="Calibration windows.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(min=1), help="Tokens per window.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Calibration sampling seed.")
@click.option("--batch-windows", default=8, show_default=True, type=click.IntRange(min=1),
              help="Calibration windows per micro-batch.")
@click.option("--max-batch-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="Candidates x windows x tokens in one batched pass (0 = auto from the model's size).")
@click.option("--blocks/--no-blocks", default=True, show_default=True, help="Also score whole blocks.")
@click.option("--units", multiple=True, help="Only units matching these fnmatch patterns (repeatable).")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(min=1),
              help="Shard the jobs over N processes (torch.distributed, gloo).")
@click.option("--threads", default=None, type=THREADS, help="Torch threads per process.")
@click.option("--restart", is_flag=True, help="Discard partial results of an interrupted run.")
@click.option("--random-init", is_flag=True, help="Random weights (with preset:NAME): for timing only.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Table to write, e.g. run/sensitivity.csv [dfplan.toml's sensitivity].")
@click.option("--force", is_flag=True, help="Write into a folder that holds another model's run or foreign files.")
@click.pass_context
def command(ctx, model_arg, corpus, tokenizer, candidates, windows, seq_len, seed, batch_windows, max_batch_tokens,
            blocks, units, nproc, threads, restart, random_init, device, out, force):
    if ctx.invoked_subcommand is not None:
        return
    model_arg = default(model_arg, "model", "--model", "sensitivity", required=False)
    corpus = default(corpus, "corpus", "--corpus", "sensitivity", required=False)
    out = default(out, "sensitivity", "--out", "sensitivity", required=False)
    missing = [n for n, v in (("--model", model_arg), ("--corpus", corpus), ("--out", out)) if not v]
    if missing:
        raise DfplanError(f"dfplan sensitivity needs {', '.join(missing)} "
                          "(e.g. --model runs/teacher --corpus builtin --out run/sensitivity.csv, "
                          "or defaults from a dfplan.toml written by `dfplan init`)")
    # checked before torch is imported: a bad path costs a fraction of a second, not a model load
    check_model_arg(model_arg)
    check_corpus(corpus)
    outp = check_out_file(out)
    if outp.suffix.lower() != ".csv":
        raise DfplanError(f"--out {out} must name a .csv file (parquet and JSON are written beside it)")
    stem = outp.stem
    own = {f"{stem}{x}" for x in (".csv", ".parquet", ".json", "_blocks.csv", "_blocks.parquet", ".partial")}
    if outp.exists() and not outp.with_suffix(".json").exists() and not force:
        raise DfplanError(f"--out {out} exists and is not a sensitivity table written by dfplan; "
                          "choose another name or pass --force")
    claim = claim_if_run_folder(outp.parent, model_arg, force=force, random_init=random_init, own=own)
    from ..sensitivity.run import RunOptions, run_sensitivity
    prov = run_sensitivity(RunOptions(
        model=model_arg, corpus=tuple(corpus), out=out, tokenizer=tokenizer, candidates=candidates,
        windows=windows, seq_len=seq_len, seed=seed, batch_windows=batch_windows,
        max_batch_tokens=max_batch_tokens, blocks=blocks, units=tuple(units), nproc=nproc, threads=threads,
        restart=restart, random_init=random_init, device=device))
    if prov is not None:
        if claim is not None:
            record_run(claim, "sensitivity")
        c = prov["cost"]
        click.echo(f"wrote {out}: {c['unit_rows']} unit rows, {c['block_rows']} block rows; "
                   f"{c['block_forwards']} block-forwards (full forwards would need "
                   f"{c['full_forward_block_equivalent']}), {c['wall_s']:.1f} s on {c['processes']} process(es)")


@command.command(name="validate", help="Check the scores against true held-out perplexity changes "
                                       "(Spearman of each metric; top-k units compressed together).")
@click.option("--model", "model_arg", required=True, help="The teacher the table was computed for.")
@click.option("--corpus", multiple=True, required=True, help="Corpus; perplexity uses its held-out split.")
@click.option("--table", required=True, type=click.Path(dir_okay=False), help="sensitivity.csv or .parquet.")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--sample", default=48, show_default=True, type=click.IntRange(min=0),
              help="(unit, spec) rows to measure; 0 = every row.")
@click.option("--top-k", "top_k", default="2,4", show_default=True, help="Sizes of the jointly compressed sets.")
@click.option("--joint-spec", default=None, help="Format for the top-k sets (default: the coarsest linear format in the table).")
@click.option("--heldout-windows", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--seq-len", default=None, type=click.IntRange(min=1), help="Default: the table's.")
@click.option("--seed", default=None, type=SEED, help="Default: the table's.")
@click.option("--batch-windows", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", default=None, type=THREADS)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="validation.json (a .md table is written beside).")
def validate_command(model_arg, corpus, table, tokenizer, sample, top_k, joint_spec, heldout_windows, seq_len,
                     seed, batch_windows, threads, out):
    from ..sensitivity.validate import ValidateOptions, run_validation
    res = run_validation(ValidateOptions(
        model=model_arg, corpus=tuple(corpus), table=table, out=out, tokenizer=tokenizer, sample=sample,
        top_k=_top_k(top_k), joint_spec=joint_spec, heldout_windows=heldout_windows, seq_len=seq_len,
        seed=seed, batch_windows=batch_windows, threads=threads))
    click.echo(res["markdown"])
