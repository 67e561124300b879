"""`dfplan init`: write ./dfplan.toml, the defaults later commands use (`dfplan search --budget 300MB`)."""
from __future__ import annotations

from pathlib import Path

import click

from ..project import load_project, render_project, write_project
from ..runfolder import check_corpus, check_model_arg, check_out_dir


@click.command(name="init", help="Write dfplan.toml here: default --model, --corpus, --sensitivity and run "
                                 "folder for later commands.\n\n"
                                 "  dfplan init --model runs/teacher --corpus data/ --run runs/r1\n"
                                 "  dfplan search --budget 300MB")
@click.option("--model", "model_arg", required=True, help="Teacher checkpoint folder, hub id or preset:NAME.")
@click.option("--corpus", multiple=True, required=True, help="Text: file, folder, glob or 'builtin' (repeatable).")
@click.option("--run", "run_dir", default="runs/main", show_default=True, help="Run folder for the outputs.")
@click.option("--sensitivity", default=None, help="Sensitivity table [RUN/sensitivity.csv].")
@click.option("--force", is_flag=True, help="Replace an existing dfplan.toml.")
def command(model_arg, corpus, run_dir, sensitivity, force):
    check_model_arg(model_arg)
    check_corpus(corpus)
    check_out_dir(run_dir, "--run")
    check_out_dir(".", "the working directory")
    if not force:
        load_project()                      # a malformed existing file is reported, not replaced
    values = {"model": model_arg, "corpus": list(corpus), "run": run_dir,
              "sensitivity": sensitivity or str(Path(run_dir) / "sensitivity.csv")}
    path = write_project(values, overwrite=force)
    click.echo(f"wrote {path}:\n{render_project(values)}", nl=False)
