"""`dfplan bench e2e | compare | nightly` (registered on the `bench` group in bench.py)."""
from __future__ import annotations

import json

import click

from ..runfolder import check_result_file
from ..sizes import parse_positive_ints


def _variant_help() -> str:
    from ..bench.variants import VARIANTS
    return "Variants, comma-separated (default: a device-specific set): " + ", ".join(VARIANTS)


@click.command(name="e2e", help="End-to-end prefill / decode latency, tok/s, peak memory and bytes "
               "of dfplan and peer runtimes, interleaved; writes one result JSON.")
@click.option("--model", "model_arg", default="preset:tiny", show_default=True,
              help="preset:NAME (with --random-init), checkpoint dir or hub id.")
@click.option("--random-init", is_flag=True, help="Random weights (presets have none).")
@click.option("--variants", default=None, help="Comma-separated variant names (`--list-variants`).")
@click.option("--list-variants", is_flag=True, help="Print the variants and exit.")
@click.option("--packed", default=None, type=click.Path(file_okay=False),
              help="Packed artifact for dfplan-packed and dfplan-lite (default: built from --plan).")
@click.option("--plan", default="dfssm", show_default=True,
              help="plan.json or built-in layout used to build dfplan-packed (and dfplan-lite).")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1, None))
@click.option("--gen", "gen_len", default=64, show_default=True, type=click.IntRange(1, None))
@click.option("--batch", "batches", default="1", show_default=True, help="Batch sizes, comma-separated.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", default=None, type=int, help="Threads for every variant.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0, None),
              help="Warm-up rounds (one sample per case each).")
@click.option("--min-samples", default=10, show_default=True, type=click.IntRange(1, None))
@click.option("--max-samples", default=200, show_default=True, type=click.IntRange(1, None))
@click.option("--min-time", "min_time_s", default=5.0, show_default=True, type=float,
              help="Time floor per case, seconds of samples.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--cache-dir", default=None, help="Where converted checkpoints / GGUF files are kept "
              "(default ~/.cache/dfplan/bench/<model>-<hash>).")
@click.option("--isolate/--no-isolate", default=True, show_default=True,
              help="One worker process per variant (per-variant peak RSS).")
@click.option("--bandwidth-mib", default=256, show_default=True, type=click.IntRange(16, None))
@click.option("--out", "out_path", default="runs/bench/e2e.json", show_default=True,
              type=click.Path(dir_okay=False), help="Result JSON.")
@click.option("--force", is_flag=True, help="Write --out even if it is a file that is not a dfplan result.")
def e2e(model_arg, random_init, variants, list_variants, packed, plan, prompt_len, gen_len, batches,
        device, threads, warmup, min_samples, max_samples, min_time_s, seed, cache_dir, isolate,
        bandwidth_mib, out_path, force):
    from ..bench.e2e import E2EConfig, format_table, run_e2e, write
    from ..bench.variants import VARIANTS, unavailable

    if list_variants:
        for v in VARIANTS.values():
            why = unavailable(v, device)
            click.echo(f"{v.name:22s} {v.description}" + (f"  [skipped here: {why}]" if why else ""))
        return
    check_result_file(out_path, force=force)
    names = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    cfg = E2EConfig(model=model_arg, random_init=random_init, variants=names, prompt_len=prompt_len,
                    gen_len=gen_len, batches=parse_positive_ints(batches), device=device, threads=threads,
                    warmup=warmup, min_samples=min_samples, max_samples=max(max_samples, min_samples),
                    min_time_s=min_time_s, seed=seed, packed=packed, plan=plan, cache_dir=cache_dir,
                    isolate=isolate, bandwidth_mib=bandwidth_mib)
    res = run_e2e(cfg, log=lambda m: click.echo(m, err=True))
    path = write(res, out_path)
    click.echo(format_table(res))
    click.echo(f"wrote {path}")


@click.command(name="compare", help="Compare two result files; exit 1 on a regression "
               "(median >= threshold slower and significant, or bytes / peak memory larger).")
@click.argument("base", type=click.Path(dir_okay=False))
@click.argument("new", type=click.Path(dir_okay=False))
@click.option("--time-threshold", default=0.10, show_default=True, type=float)
@click.option("--size-threshold", default=0.02, show_default=True, type=float)
@click.option("--alpha", default=0.01, show_default=True, type=float, help="Mann-Whitney U level.")
@click.option("--allow-busy", is_flag=True, help="Judge timings even if a run's load average "
              "exceeded the CPU count (other work on the machine).")
@click.option("--json", "as_json", is_flag=True)
def compare(base, new, time_threshold, size_threshold, alpha, allow_busy, as_json):
    from ..bench.compare import compare_files, format_comparison

    c = compare_files(base, new, time_threshold=time_threshold, size_threshold=size_threshold,
                      alpha=alpha, allow_busy=allow_busy)
    click.echo(json.dumps(c.to_json(), indent=1) if as_json else format_comparison(c))
    if c.regressions:
        click.get_current_context().exit(1)   # main() returns 1: a regression, not a usage error


@click.command(name="nightly", help="Run the fixed suite (kernels + e2e), compare with the history "
               "(flag after two consecutive violations), append, write summary.md + trend.png.")
@click.option("--history", required=True, type=click.Path(file_okay=False))
@click.option("--suite", default="full", show_default=True, type=click.Choice(["full", "tiny"]))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--threads", default=None, type=int)
@click.option("--variants", default=None, help="e2e variants (default: the device's set).")
def nightly(history, suite, device, threads, variants):
    from ..bench.nightly import NightlyConfig, run_nightly

    names = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
    rep = run_nightly(NightlyConfig(history=history, suite=suite, device=device, threads=threads,
                                    e2e_variants=names), log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(rep, indent=1))
    click.echo(f"summary: {history}/summary.md")
    if any(rep["flagged"].values()):
        click.get_current_context().exit(1)   # main() returns 1: a regression, not a usage error
