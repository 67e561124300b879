"""The `dfplan` command line: parse arguments once, call a typed library function.

Each subcommand lives in dfplan/commands/<name>.py and exposes a click command named
`command`. No logic lives in the callbacks beyond parsing; user errors (DfplanError) print
one line and exit 2.
"""
from __future__ import annotations

import importlib
import sys

import click

from .errors import DfplanError

# name -> one-line help; the module dfplan.commands.<name> provides `command`.
SUBCOMMANDS = {
    "init": "Write dfplan.toml: default model, corpus and run folder for later commands.",
    "zoo": "Train or list built-in teacher models.",
    "size": "Exact packed size of a model under a plan or layout.",
    "sensitivity": "Per-layer KL sensitivity of every candidate format.",
    "search": "Choose per-layer formats under a memory budget.",
    "distill": "Distill a plan into a packed DF-SSM student.",
    "eval": "Perplexity and zero-shot accuracy of a model or packed artifact.",
    "generate": "Generate text from any loadable model, streamed to stdout.",
    "pack": "Write a packed artifact from a plan or layout (no distillation).",
    "bench": "Latency, memory and size benchmarks.",
    "report": "Render a run directory into markdown and plots.",
    "probe": "Knowledge-organisation probe across depth.",
    "demo": "The whole pipeline on the built-in default teacher, offline.",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(SUBCOMMANDS)

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        try:
            mod = importlib.import_module(f"dfplan.commands.{name.replace('-', '_')}")
        except ModuleNotFoundError as e:
            if e.name != f"dfplan.commands.{name}":
                raise
            return _not_implemented(name)
        return mod.command


def _not_implemented(name: str) -> click.Command:
    @click.command(name=name, help=SUBCOMMANDS[name] + " (not implemented yet)",
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def cmd():
        raise DfplanError(f"'dfplan {name}' is not implemented yet")
    return cmd


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dfplan")
def cli():
    """dfplan: sensitivity-guided 1-bit + low-rank compression of Mamba-2 models."""


def _user_errors() -> tuple[type[Exception], ...]:
    """DfplanError, plus the kernels' own KernelError once the kernels are loaded (a kernel error
    cannot happen before; checking sys.modules keeps the CLI from importing torch to parse)."""
    kernels = sys.modules.get("dfplan.kernels.errors")
    return (DfplanError, kernels.KernelError) if kernels else (DfplanError,)


def main(argv=None) -> int:
    try:
        # standalone_mode=False: click returns ctx.exit(N)'s code (e.g. bench compare's 1 for a
        # regression) instead of calling sys.exit; callbacks themselves return None
        rv = cli.main(args=argv, standalone_mode=False)
    except _user_errors() as e:
        click.echo(f"error: {e}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.UsageError as e:
        # one line like every other user error: name the command and the problem
        where = f"dfplan {e.ctx.command_path.partition(' ')[2]}".strip() if e.ctx else "dfplan"
        click.echo(f"error: {where}: {e.format_message()} (see {where} --help)", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return 2 if e.exit_code == 1 else e.exit_code
    except OSError as e:
        # the machine refused a read or write the checks could not foresee (disk full, a folder
        # removed under us): the user can act on it, a traceback would not help
        name = f" {e.filename}" if e.filename else ""
        click.echo(f"error: cannot access{name}: {e.strerror or e}", err=True)
        return 2
    except click.exceptions.Exit as e:
        return e.exit_code
    return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
