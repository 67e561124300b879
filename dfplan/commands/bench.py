"""`dfplan bench ...`: benchmarks. Each benchmark is a subcommand of this group."""
from __future__ import annotations

import click

from ..errors import DfplanError


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DfplanError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise DfplanError(f"expected positive integers, got {text!r}")
    return vals


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
def kernels(out_dir, model, batches, units, impls, device, budget_s, threads, bandwidth_mib):
    from ..bench.kernels import BenchConfig, format_table, run_kernel_bench, write

    cfg = BenchConfig(model=model, batches=_ints(batches), units=_names(units), impls=_names(impls),
                      device=device, budget_s=budget_s, threads=threads,
                      bandwidth_bytes=bandwidth_mib << 20)
    res = run_kernel_bench(cfg)
    path = write(res, out_dir)
    click.echo(format_table(res))
    click.echo(f"wrote {path}")
