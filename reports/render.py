"""`dfplan report` as a library call: run directory -> report.md + PNG figures beside it.

All or nothing: the model check, every section and every figure run first, into memory and a
staging folder next to the report; only then are the figures moved into `<stem>_figures/` and
report.md renamed into place. A bad run directory, artifacts of two models, or a corrupt file
raise DfplanError before anything is replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dfplan.errors import DfplanError
from dfplan.fileio import write_text_atomic

from . import allocation, bench, curves, environment, evaluation, pareto, plans, probe, sensitivity, size, study
from .context import Context
from .fmt import table
from .identity import check_and_config, load_plans, plan_consistency
from .run import open_run, plan_variants

SECTIONS = (("Plans", plans), ("Sensitivity", sensitivity), ("Pareto front", pareto),
            ("Per-layer allocation", allocation), ("Size breakdown", size), ("Optuna search", study),
            ("Training and distillation", curves), ("Evaluation", evaluation),
            ("Latency and throughput", bench), ("Knowledge probe", probe), ("Environment", environment))
USED_HEADING = "## Artifacts used"


@dataclass(frozen=True)
class Report:
    path: Path
    figures: tuple          # paths of the PNGs written
    used: dict              # artifact (relative to the run) -> what it was used for


def _anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _header(ctx: Context) -> str:
    run = ctx.run
    name = run.root.resolve().name
    lines = [f"# dfplan report: {name}", ""]
    model = ctx.cfg.name if ctx.cfg is not None and ctx.cfg.name not in ("model", "custom") else None
    if ctx.cfg is not None:
        c = ctx.cfg
        lines.append(f"Model: {model + ', ' if model else ''}d_model {c.d_model}, {c.n_layer} layers, vocabulary "
                     f"{c.vocab_size:,} (config from `{ctx.cfg_source or 'the run'}`). Run directory: `{ctx.run_arg}`.")
    else:
        lines.append(f"Run directory: `{ctx.run_arg}` (no model config found).")
    rj = run.json("run.json", "the model each command of the folder ran on (fingerprint)")
    if rj and isinstance(rj.get("commands"), dict):
        lines.append(f"Commands recorded in `run.json`: {', '.join(sorted(rj['commands']))} on model "
                     f"`{rj.get('model')}` (fingerprint {str(rj.get('fingerprint'))[:12]}).")
    lines.append("")
    demo = run.json("demo.json", "pipeline stages and their status")
    if demo and isinstance(demo.get("stages"), list):
        rows = [[s.get("stage", "?"), s.get("status", "?"), s.get("result", "")] for s in demo["stages"]
                if isinstance(s, dict)]
        lines += ["Stages (`demo.json`):", "", table(rows, ["stage", "status", "result"]), ""]
    lines += ["Sections: " + " | ".join(f"[{t}](#{_anchor(t)})" for t, _ in SECTIONS), ""]
    return "\n".join(lines)


def _used(ctx: Context) -> str:
    rows = [[f"`{rel}`", why] for rel, why in sorted(ctx.run.used.items())]
    return "\n".join([USED_HEADING, "", "Every file of the run this report was made from:", "",
                      table(rows, ["file", "used for"])])


def _section(ctx: Context, title: str, mod) -> str:
    before = set(ctx.run.used)
    try:
        return mod.render(ctx)
    except DfplanError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        # a file that parses but does not hold what its stage writes: name the files, not a traceback
        files = sorted(set(ctx.run.used) - before) or sorted(ctx.run.used)
        raise DfplanError(f"cannot render the {title} section: unexpected content in "
                          f"{', '.join(str(ctx.run.path(f)) for f in files) or 'the run'} "
                          f"({type(e).__name__}: {e}); rerun the stage that wrote it") from None


def render_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Report:
    run = open_run(run_dir)
    out_path = Path(out) if out is not None else run.root / "report.md"
    if out_path.suffix.lower() != ".md":
        raise DfplanError(f"--out {out_path} must name a .md file (figures are written beside it)")
    if out_path.is_dir():
        raise DfplanError(f"--out {out_path} is a folder; name the report file, e.g. {out_path / 'report.md'}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig_name = f"{out_path.stem}_figures"
    variants = plan_variants(run)
    cfg, cfg_source = check_and_config(run, variants)
    plan_objs = load_plans(run, variants, cfg)
    stage = Path(tempfile.mkdtemp(prefix=f".{fig_name}.", dir=out_path.parent))
    try:
        ctx = Context(run=run, run_arg=str(run_dir), report_arg=str(out if out is not None else out_path),
                      stage_dir=stage, fig_prefix=f"{fig_name}/", report_dir=out_path.parent, cfg=cfg, cfg_source=cfg_source,
                      variants=variants, plans=plan_objs)
        ctx.warnings += plan_consistency(run, variants, plan_objs)
        parts = [_header(ctx)] + [_section(ctx, t, m) for t, m in SECTIONS]
        parts.append(_used(ctx))
        text = "\n\n".join(p.rstrip() for p in parts) + "\n"
        final = out_path.parent / fig_name
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{fig_name}.old.", dir=out_path.parent))
            os.replace(final, old / "x")
        os.replace(stage, final)
        write_text_atomic(out_path, text)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return Report(out_path, tuple(final / f for f in ctx.figures), dict(run.used))
