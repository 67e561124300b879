"""`dfplan report RUN_DIR [--out report.md]`: a run directory rendered as markdown with figures."""
from __future__ import annotations

import click


@click.command(name="report", help="Render a run directory (sensitivity, plans, distillation, eval, bench) "
               "into markdown with PNG figures beside it.")
@click.argument("run_dir", type=click.Path())
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Report file (default RUN_DIR/report.md); figures go to <stem>_figures/ beside it.")
def command(run_dir, out):
    from ..reports import render_report
    rep = render_report(run_dir, out)
    click.echo(f"wrote {rep.path} ({len(rep.figures)} figures, {len(rep.used)} artifacts)")
