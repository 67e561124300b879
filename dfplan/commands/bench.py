"""`dfplan bench ...`: benchmarks. Each benchmark is a subcommand of this group."""
from __future__ import annotations

import click

from ..errors import DfplanError
from ..runfolder import check_result_dir, check_result_file
from ..sizes import parse_positive_ints
from ._types import THREADS
from .bench_e2e import compare as _compare
from .bench_e2e import e2e as _e2e
from .bench_e2e import nightly as _nightly


def _names(text: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None


@click.group(name="bench", help="Latency, memory and size benchmarks.")
def command():
    pass


@command.command(name="kernels", help="Time the 1-bit / int8 linear kernels on a model's shapes "
                 "(weights not in cache) against float baselines; writes OUT/kernels.json.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for kernels.json.")
@click.option("--model", default="1.3b", show_default=True, help="Preset whose shapes to use.")
@click.option("--batch", "batches", default="1,8", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--units", default="in_proj,out_proj,lm_head", show_default=True,
              help="Shapes to time: in_proj, out_proj, lm_head.")
@click.option("--impls", default=None, help="Implementations (default: all for the device): "
              "bin, bin+r16, int8, fbgemm-int8, bf16, fp32 on CPU; bin, bin+r16, int8, fp16 on CUDA.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--budget", "budget_s", default=1.0, show_default=True, type=float,
              help="Seconds of samples per measurement.")
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's choice).")
@click.option("--bandwidth-mib", default=256, show_default=True, type=click.IntRange(16, None),
              help="Buffer size for the same-run memory bandwidth measurement (x4 on CUDA).")
@click.option("--force", is_flag=True, help="Write into --out even if it holds files dfplan did not write.")
def kernels(out_dir, model, batches, units, impls, device, budget_s, threads, bandwidth_mib, force):
    check_result_dir(out_dir, {"kernels.json"}, force=force)
    from ..bench.kernels import BenchConfig, format_table, run_kernel_bench, write

    cfg = BenchConfig(model=model, batches=parse_positive_ints(batches), units=_names(units), impls=_names(impls),
                      device=device, budget_s=budget_s, threads=threads,
                      bandwidth_bytes=bandwidth_mib << 20)
    res = run_kernel_bench(cfg)
    path = write(res, out_dir)
    click.echo(format_table(res))
    click.echo(f"wrote {path}")


@command.command(name="decode", help="One model's batch-1 decode speed against its bandwidth bound "
                 "(bandwidth measured in the same run) and where the time per token goes.")
@click.option("--model", "model_arg", required=True, help="Packed artifact, checkpoint folder, preset:NAME.")
@click.option("--threads", default=1, show_default=True, type=THREADS)
@click.option("--prompt-len", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--state-dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="SSM state precision (default: the artifact plan's, else fp32).")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--bandwidth-mib", default=256, show_default=True, type=click.IntRange(16, None))
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Result JSON.")
@click.option("--force", is_flag=True, help="Write --out even if it is a file that is not a dfplan result.")
def decode(model_arg, threads, prompt_len, new_tokens, state_dtype, repeats, bandwidth_mib, out, force):
    from ..bench.decode import run_decode_bench, summary, write

    if out:
        check_result_file(out, force=force)        # refused before minutes of measuring
    res = run_decode_bench(model_arg, threads, prompt_len, new_tokens, state_dtype, repeats, bandwidth_mib)
    click.echo(summary(res))
    if out:
        click.echo(f"wrote {write(res, out)}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DfplanError(f"expected comma-separated fractions, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise DfplanError(f"expected fractions in (0, 1], got {text!r}")
    return vals


@command.command(name="dynamic", help="Per-prompt dynamic support (units chosen from random "
                 "sketches of their prompt activation energies): KL to the full model over the "
                 "continuation and decode speed vs fraction kept and measurements m, against an "
                 "oracle and a random support; writes OUT/dynamic.json.")
@click.option("--model", "model_arg", required=True,
              help="Checkpoint dir, zoo teacher dir, packed artifact dir, or preset:NAME (random weights).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for dynamic.json.")
@click.option("--corpus", multiple=True, help="Prompt text (file, folder, glob, builtin-heldout); "
              "default: random token ids.")
@click.option("--tokenizer", default=None, help="tokenizer.json (default: the model's own).")
@click.option("--prompts", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(min=2))
@click.option("--gen", default=32, show_default=True, type=click.IntRange(min=1),
              help="Continuation tokens (greedy, from the full model) scored for KL.")
@click.option("--keep", default="0.25,0.5,0.75", show_default=True,
              help="Fractions of units kept per layer.")
@click.option("--m", "m_fracs", default="0.125,0.25,0.5", show_default=True,
              help="Measurements per layer, as fractions of that layer's unit count.")
@click.option("--block", default=None, type=click.IntRange(min=1),
              help="d_inner channels per SSM unit (default: headdim, i.e. units = SSM heads).")
@click.option("--mlp-block", default=128, show_default=True, type=click.IntRange(min=1),
              help="Hidden channels per MLP unit (hybrids with d_intermediate > 0).")
@click.option("--sketch", default="gaussian", show_default=True,
              type=click.Choice(["gaussian", "rademacher"]))
@click.option("--recovery", default="omp", show_default=True, type=click.Choice(["omp", "lasso"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quality/--no-quality", default=True, show_default=True, help="Measure KL.")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Time decode steps.")
@click.option("--budget", "budget_s", default=1.0, show_default=True, type=float,
              help="Seconds of samples per decode-step timing.")
@click.option("--threads", default=None, type=int, help="torch threads (default: torch's choice).")
@click.option("--force", is_flag=True, help="Write into --out even if it holds files dfplan did not write.")
def dynamic(model_arg, out_dir, corpus, tokenizer, prompts, prompt_len, gen, keep, m_fracs, block,
            mlp_block, sketch, recovery, seed, quality, speed, budget_s, threads, force):
    check_result_dir(out_dir, {"dynamic.json"}, force=force)
    from ..bench.dynamic import DynamicBenchConfig, format_table, run_dynamic_bench, write

    cfg = DynamicBenchConfig(model=model_arg, corpus=tuple(corpus), tokenizer=tokenizer,
                             prompts=prompts, prompt_len=prompt_len, gen=gen,
                             keep=_fractions(keep), m_fracs=_fractions(m_fracs), block=block,
                             mlp_block=mlp_block, sketch=sketch, recovery=recovery, seed=seed,
                             quality=quality, speed=speed, budget_s=budget_s, threads=threads)
    res = run_dynamic_bench(cfg)
    path = write(res, out_dir)
    click.echo(format_table(res))
    click.echo(f"wrote {path}")


for _cmd in (_e2e, _compare, _nightly):
    command.add_command(_cmd)


@command.command(name="planner", help="Is the KL-guided plan better than uniform allocations at equal bytes, "
                 "and how close does Optuna get to the exact MILP optimum? Writes OUT/bench.json and bench.md.")
@click.option("--model", required=True, help="Teacher checkpoint folder or preset.")
@click.option("--sensitivity", required=True, type=click.Path(dir_okay=False), help="sensitivity.csv of that model.")
@click.option("--corpus", multiple=True, required=True, help="Held-out text (repeatable; see README Data).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory for the results.")
@click.option("--trials", default=200, show_default=True, type=click.IntRange(1, None), help="Optuna trials per sampler.")
@click.option("--budget", default=None, help="Budget for the Optuna comparison (default: bin+r16 uniform bytes).")
@click.option("--heldout-windows", default=16, show_default=True, type=click.IntRange(1, None))
@click.option("--seq-len", default=None, type=click.IntRange(1, None))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Write into --out even if it holds files dfplan did not write.")
def planner(model, sensitivity, corpus, out_dir, trials, budget, heldout_windows, seq_len, seed, force):
    check_result_dir(out_dir, {"bench.json", "bench.md"}, force=force)
    from ..sizes import parse_bytes

    budget_bytes = parse_bytes(budget) if budget else None
    from ..bench.planner import run_benchmark

    res = run_benchmark(model, sensitivity, list(corpus), out_dir, trials, budget_bytes, heldout_windows, seq_len, seed)
    click.echo(f"wrote {out_dir}/bench.md (Pareto front in {res['front_s']:.1f} s)")
