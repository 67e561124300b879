"""The probe's figure: metrics (rows) along depth (x) for the teacher and a student, the
teacher's phases shaded and the student's phase edges dotted, plus the one-block swap
damage when a student was compared."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dfplan.fileio import atomic_path  # noqa: E402

PHASE_COLORS = {"categorisation": "tab:blue", "recall": "tab:orange", "formatting": "tab:green"}


def _shade(ax, phases: dict | None, dotted: dict | None) -> None:
    for name, color in PHASE_COLORS.items():
        r = (phases or {}).get(name)
        if r:
            ax.axvspan(r[0] - 0.5, r[1] + 0.5, color=color, alpha=0.12, lw=0)
        r = (dotted or {}).get(name)
        if r:
            for edge in (r[0] - 0.5, r[1] + 0.5):
                ax.axvline(edge, color=color, ls=":", lw=1.2)


def probe_figure(path: str | os.PathLike, teacher_rows: list[dict], teacher_phases: dict, k: int, chance: float,
                 student_rows: list[dict] | None = None, student_phases: dict | None = None,
                 swap_rows: list[dict] | None = None, title: str = "") -> None:
    panels = [("category_accuracy", "nearest-centroid\ncategory accuracy", False),
              ("category_separation", "category separation\n(between - within cos dist)", False),
              (f"top{k}_rate", f"answer in lens top-{k}\n(share of prompts)", False),
              ("median_rank", "answer's median\nlens rank + 1", True)]
    n = len(panels) + (1 if swap_rows else 0)
    fig, axes = plt.subplots(n, 1, figsize=(7.5, 2.1 * n), sharex=True, squeeze=False)
    axes = axes[:, 0]
    x = [r["layer"] for r in teacher_rows]
    for ax, (key, label, logy) in zip(axes, panels):
        _shade(ax, teacher_phases, student_phases)
        shift = 1 if logy else 0               # rank 0 (top-1) still has a place on a log axis
        ax.plot(x, [r[key] + shift for r in teacher_rows], "o-", color="k", ms=3, label="teacher")
        if student_rows:
            ax.plot(x, [r[key] + shift for r in student_rows], "s--", color="tab:red", ms=3, label="student")
        if key == "category_accuracy":
            ax.axhline(chance, color="gray", lw=0.8, ls="--", label="chance")
        if logy:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    if swap_rows:
        ax = axes[-1]
        _shade(ax, teacher_phases, None)
        ax.bar([r["block"] for r in swap_rows], [r["logprob_drop"] for r in swap_rows], color="tab:red", width=0.6)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_ylabel("answer log-prob drop\nwith only this block\nthe student's", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.3) for c in PHASE_COLORS.values()]
    fig.legend(handles, [f"{p} (teacher; student dotted)" for p in PHASE_COLORS], fontsize=7,
               loc="lower center", ncol=3, frameon=False)
    axes[-1].set_xlabel("depth (-1 = embedding, i = after block i)")
    axes[-1].set_xticks(x if len(x) <= 25 else x[::max(1, len(x) // 12)])
    if title:
        axes[0].set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
