"""`dfplan size`: exact packed size of a model under a plan or a built-in layout."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import DfplanError
from ..formats.layouts import describe_layouts, layout_names
from ..runfolder import check_model_arg


def choose_plan(cfg, model_arg: str, plan_path: str | None, layout: str | None):
    """The plan to size: --plan, --layout, a packed directory's own plan.json, else fp16."""
    from ..formats.layouts import layout_plan
    from ..formats.plan import Plan

    if plan_path and layout:
        raise DfplanError("pass either --plan or --layout, not both")
    if plan_path:
        return Plan.from_json(plan_path), f"plan {plan_path}"
    if layout:
        return layout_plan(layout, cfg), f"layout {layout}"
    own = Path(model_arg).expanduser() / "plan.json"
    if (own.parent / "manifest.json").exists() and own.exists():
        return Plan.from_json(own), f"packed plan {own}"
    return layout_plan("fp16", cfg), "layout fp16 (default)"


def size_report(model_arg: str, plan_path: str | None = None, layout: str | None = None):
    from ..formats.size import plan_bytes
    from ..loading import load_config

    cfg = load_config(model_arg)
    plan, source = choose_plan(cfg, model_arg, plan_path, layout)
    return cfg, plan_bytes(cfg, plan), source


_LAYOUT_HELP = "Built-in layout: " + "; ".join(f"{k} = {v}" for k, v in describe_layouts().items())


@click.command(name="size", help="Exact packed size of a model under a plan or layout.")
@click.option("--model", "model_arg", required=True, help="preset:NAME, checkpoint dir, packed dir or hub id.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None, help="plan.json to size.")
@click.option("--layout", type=click.Choice(layout_names()), default=None, help=_LAYOUT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print {total_bytes, components} with exact ints.")
def command(model_arg, plan_path, layout, as_json):
    check_model_arg(model_arg)
    from ..formats.size import dfssm_comparison, format_table
    from ..runtime.decode import state_bytes

    cfg, report, source = size_report(model_arg, plan_path, layout)
    plan, _ = choose_plan(cfg, model_arg, plan_path, layout)
    state = {"state_dtype": plan.state_dtype, **state_bytes(cfg, plan.state_dtype)}
    if as_json:
        click.echo(json.dumps({"model": cfg.name, "plan": source, **report.to_json(), "decode_state": state},
                              indent=1))
        return
    click.echo(f"{cfg.name}: {source}")
    click.echo(format_table(report))
    click.echo(f"total {report.total_bytes:,} bytes = {report.total_bytes / 1e6:,.2f} MB "
               f"({report.total_bytes / 2**20:,.2f} MiB); MB = 10^6 bytes; safetensors header not included")
    click.echo(f"decoding also reads and writes per token (batch 1, not in the total): SSM state in "
               f"{state['state_dtype']} {state['ssm_state_rw']:,} bytes, conv windows {state['conv_state_rw']:,} bytes")
    if layout == "dfssm" and _is_paper_model(cfg):
        click.echo("\nagainst the DF-SSM paper's breakdown:")
        click.echo(dfssm_comparison(report))


def _is_paper_model(cfg) -> bool:
    """The paper's breakdown is for Mamba-2 1.3B; beside any other model it would mislead."""
    from ..config import Mamba2Config
    return cfg.to_mamba_ssm_dict() == Mamba2Config.preset("1.3b").to_mamba_ssm_dict()
