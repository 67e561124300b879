"""`dfplan search`: choose a format per layer under a byte budget (exact MILP, optionally Optuna)."""
from __future__ import annotations

import sys

import click

from ..project import default
from ..runfolder import check_model_arg, claim_run, record_run
from ..sizes import parse_bytes
from ._types import SEED


def _info(msg: str) -> None:
    click.echo(msg, err=True)


@click.command(name="search", help="Choose per-layer formats under a memory budget.\n\n"
               "  dfplan search --budget 300MB            (model, run folder from ./dfplan.toml)\n"
               "  dfplan search --model runs/teacher --budget 300MB --out run\n"
               "  dfplan search --model preset:mamba2-1.3b --random-init --budget 278MB --out run\n"
               "  dfplan search --budget 300MB --state-dtype auto   (also choose the SSM state precision)")
@click.option("--model", "model_arg", default=None,
              help="Checkpoint dir, hub id or preset:NAME (config only; weights only for --objective measured) "
                   "[dfplan.toml's model].")
@click.option("--budget", required=True, help="Byte budget: 300MB (10^6), 278MiB (2^20), 2.5GB or plain bytes.")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run directory (plan.json, plan.md, study.db) [dfplan.toml's run].")
@click.option("--sensitivity", default=None, type=click.Path(dir_okay=False),
              help="Sensitivity table [dfplan.toml's sensitivity, else OUT/sensitivity.csv].")
@click.option("--solver", type=click.Choice(["milp", "tpe", "nsga2", "all"]), default="milp", show_default=True,
              help="milp: exact optimum of the additive KL; tpe / nsga2: Optuna, warm-started from it.")
@click.option("--trials", default=200, show_default=True, type=click.IntRange(min=0),
              help="Total Optuna trials per study (a rerun resumes and runs only the rest).")
@click.option("--objective", type=click.Choice(["predicted", "measured"]), default="predicted", show_default=True,
              help="predicted: sum of per-unit KL; measured: true KL of each plan on held-out windows (needs --corpus).")
@click.option("--storage", default=None,
              help="Optuna RDB URL (default sqlite:///OUT/study.db; e.g. postgresql://user@host/db to share a "
                   "study), or 'memory' for a study that is not kept.")
@click.option("--corpus", multiple=True, help="Held-out text for --objective measured, --validate and --state-dtype auto's prompt: "
              "file, folder, glob or 'builtin' "
              "[dfplan.toml's corpus].")
@click.option("--tokenizer", default=None, help="tokenizer.json or hub id (default: the model's own).")
@click.option("--heldout-windows", default=16, show_default=True, type=click.IntRange(min=1),
              help="Held-out windows per measured plan.")
@click.option("--seq-len", default=None, type=click.IntRange(min=2),
              help="Held-out window length (default: the sensitivity table's, so windows stay disjoint from its calibration).")
@click.option("--validate", default=0, show_default=True, type=click.IntRange(min=0),
              help="Measure the chosen plan and up to N-1 front / uniform plans on held-out windows (needs "
                   "--corpus): fits the surrogate's correction and reports how well it tracks.")
@click.option("--random-init", is_flag=True, help="A preset without weights: plan with the size-only prior.")
@click.option("--prior", is_flag=True, help="Use the size-only prior instead of a sensitivity table (no quality claim).")
@click.option("--front-points", default=24, show_default=True, type=click.IntRange(min=2),
              help="Budgets swept for the MILP Pareto front.")
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--time-limit", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds per MILP solve.")
@click.option("--state-dtype", type=click.Choice(["fp32", "bf16", "fp16", "auto"]), default="fp32", show_default=True,
              help="SSM state precision recorded in the plan (the runtime decodes with it). auto: measure the "
                   "KL of bf16 and fp16 states against fp32 on this model (a --corpus prompt, else random ids) "
                   "and keep the cheapest within --state-kl-max, else fp32.")
@click.option("--state-kl-max", default=1e-3, show_default=True, type=click.FloatRange(min=0),
              help="auto: largest mean KL (nats/token) vs the fp32 state a low-precision state may cost.")
@click.option("--state-tokens", default=512, show_default=True, type=click.IntRange(min=2),
              help="auto: generated positions the state KL is averaged over.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out that is not this model's run folder.")
def command(model_arg, budget, out, sensitivity, solver, trials, objective, storage, corpus, tokenizer,
            heldout_windows, seq_len, validate, random_init, prior, front_points, seed, time_limit,
            state_dtype, state_kl_max, state_tokens, force):
    # everything a user can get wrong is checked here, before torch or a model is loaded
    model_arg = default(model_arg, "model", "--model", "search")
    out_given = out is not None
    out = default(out, "run", "--out", "search")
    if objective == "measured" or validate or state_dtype == "auto":
        corpus = default(corpus, "corpus", "--corpus", "search", required=False)
    if not (random_init or prior or out_given):      # an explicit --out keeps OUT/sensitivity.csv
        sensitivity = default(sensitivity, "sensitivity", "--sensitivity", "search", required=False)
    check_model_arg(model_arg)
    parse_bytes(budget)
    claim = claim_run(out, model_arg, force=force, random_init=random_init, command="search")
    from ..planner.run import SearchOptions, search
    search(SearchOptions(model=model_arg, budget=budget, out=out, sensitivity=sensitivity, solver=solver,
                         trials=trials, objective=objective, storage=storage, corpus=tuple(corpus),
                         tokenizer=tokenizer, random_init=random_init, prior=prior, seed=seed,
                         front_points=front_points, heldout_windows=heldout_windows, seq_len=seq_len,
                         validate=validate, time_limit=time_limit, progress=sys.stderr.isatty(),
                         state_dtype=state_dtype, state_kl_max=state_kl_max, state_tokens=state_tokens,
                         argv=tuple(sys.argv[1:])),
           say=_info)
    record_run(claim, "search")
