"""What every section gets: the run, the model config, the plan variants, where figures go.

Figures are drawn with matplotlib's Agg backend (no display needed) into a staging folder;
render.py moves them next to the report only after every section has succeeded, so a failed
report leaves neither a half-written report.md nor a mix of old and new figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .fmt import code, shell_join
from .run import RunDir, Variant

DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported lazily: matplotlib is slow to import)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    plt.style.use("default")        # Optuna's plots switch the global style; every figure starts clean
    plt.rcParams.update({"figure.dpi": DPI, "font.size": 9, "axes.titlesize": 10,
                         "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 8,
                         # constrained layout makes room for outside legends in one draw
                         # (bbox_inches="tight" would draw every figure twice)
                         "figure.constrained_layout.use": True,
                         "svg.hashsalt": "dfplan"})
    return plt


@dataclass
class Context:
    run: RunDir
    run_arg: str                 # the run directory as the user named it (for commands)
    report_arg: str              # the report path as the user named it
    stage_dir: Path              # figures are written here first
    fig_prefix: str              # link prefix relative to the report, e.g. "figures/"
    report_dir: Path = Path(".")  # the folder report.md goes to (for relative links)
    cfg: object | None = None    # dfplan.config.Mamba2Config of the run's model, when known
    cfg_source: str = ""         # which artifact the config came from
    variants: list = field(default_factory=list)   # [Variant]
    plans: dict = field(default_factory=dict)      # variant name -> dfplan.formats.plan.Plan
    figures: list = field(default_factory=list)    # file names written to stage_dir
    warnings: list = field(default_factory=list)

    def save(self, fig, name: str, alt: str) -> str:
        """Write `fig` as <name>.png; -> the markdown image line."""
        plt = pyplot()
        fname = f"{name}.png"
        fig.savefig(self.stage_dir / fname, dpi=DPI,
                    metadata={"Software": None})   # no version stamp: same data, same bytes
        plt.close(fig)
        self.figures.append(fname)
        return f"![{alt}]({self.fig_prefix}{fname})"

    def report_cmd(self) -> str:
        return shell_join(["dfplan", "report", self.run_arg, "--out", self.report_arg])

    def reproduce(self, *data_cmds: str) -> str:
        """The shell block beside a figure: the command(s) that made its data, then the report."""
        return "Reproduce:\n\n" + code(*data_cmds, self.report_cmd())

    def rel(self, v: Variant, name: str) -> str:
        return v.rel(name)

    def link(self, rel: str) -> str:
        """A relative link from the report to a file of the run."""
        import os
        return os.path.relpath(self.run.path(rel), self.report_dir).replace(os.sep, "/")

    def path_arg(self, rel: str) -> str:
        """`rel` as a path a user would type (under the run directory as they named it)."""
        base = self.run_arg.rstrip("/")
        return f"{base}/{rel}" if base not in ("", ".") else rel
