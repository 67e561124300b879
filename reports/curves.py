"""Training curves: the teacher's (loss, validation perplexity) and each plan's distillation
(loss, KL to the teacher, CE against the text, by phase of the DF-SSM schedule)."""
from __future__ import annotations

from . import commands
from .context import Context, pyplot
from .fmt import count, fixed, missing, sig, table

TEACHER_LOG = "teacher/train_log.jsonl"
TEACHER_META = "teacher/zoo.json"
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


def _num(rows, key):
    return [r.get(key) for r in rows]


def figure(ctx: Context, teacher: list | None, logs: dict) -> str:
    plt = pyplot()
    panels = (1 if teacher else 0) + (1 if logs else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels + 0.6, 3.4), squeeze=False)
    axes = list(axes[0])
    if teacher:
        ax = axes.pop(0)
        t = [r for r in teacher if r.get("loss") is not None]
        ax.plot([r["tokens"] / 1e3 for r in t], [r["loss"] for r in t], "-o", ms=3, color="black",
                label="train loss (EMA)")
        ax.set_xlabel("tokens (thousands)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title("Teacher training")
        v = [r for r in teacher if r.get("val_ppl") is not None]
        if v:
            ax2 = ax.twinx()
            ax2.plot([r["tokens"] / 1e3 for r in v], [r["val_ppl"] for r in v], "--s", ms=3, color="tab:gray",
                     label="validation ppl")
            ax2.set_ylabel("validation perplexity")
            ax2.grid(False)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper right", frameon=False)
    if logs:
        ax = axes.pop(0)
        for (name, rows), col in zip(logs.items(), COLORS):
            x = [r.get("tokens", 0) / 1e3 for r in rows]
            ax.plot(x, _num(rows, "kl"), "-", color=col, label=f"{name}: KL(teacher || student)")
            if any(r.get("ce") is not None for r in rows):
                ax.plot(x, _num(rows, "ce"), ":", color=col, label=f"{name}: CE on text")
            # where the schedule changes phase (anneal -> correct -> final)
            for a, b in zip(rows, rows[1:]):
                if a.get("phase") != b.get("phase"):
                    ax.axvline(b.get("tokens", 0) / 1e3, color=col, lw=0.8, alpha=0.5)
                    ax.annotate(str(b.get("phase")), (b.get("tokens", 0) / 1e3, 0.02),
                                xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="bottom",
                                ha="right", color=col)
        ax.set_yscale("log")
        ax.set_xlabel("distillation tokens (thousands)")
        ax.set_ylabel("nats/token (log)")
        ax.set_title("Distillation (vertical lines: phase changes)")
        ax.legend(loc="lower right", frameon=False)
    return ctx.save(fig, "training_curves", "training and distillation curves")


def render(ctx: Context) -> str:
    out = ["## Training and distillation", ""]
    teacher = ctx.run.jsonl(TEACHER_LOG, "teacher training curve")
    zoo = ctx.run.json(TEACHER_META, "teacher summary (perplexity vs unigram)")
    logs, metas, lines = {}, {}, []
    for v in ctx.variants or []:
        rel = v.rel("student/train_log.jsonl")
        rows = ctx.run.jsonl(rel, "distillation curve")
        meta = ctx.run.json(v.rel("student/distill.json"), "distillation settings and speed")
        if rows:
            logs[v.name] = rows
        else:
            lines.append(f"- {v.name}: " + missing(rel, "dfplan distill"))
        if meta:
            metas[v.name] = meta
    if teacher is None:
        lines.insert(0, "- " + missing(TEACHER_LOG, "dfplan zoo train", "teacher curve"))
    if not teacher and not logs:
        return "\n".join(out + lines)
    cmds = [commands.distill(metas.get(v.name), ctx.path_arg(v.rel("student"))) for v in ctx.variants]
    out += [figure(ctx, teacher, logs), "", ctx.reproduce(*cmds), ""] + lines + ([""] if lines else [])
    rows = []
    if zoo:
        rows.append(["teacher", count(zoo.get("tokens_seen")), count(zoo.get("steps")), "",
                     f"val ppl {fixed(zoo.get('val_ppl'))} (unigram {fixed(zoo.get('unigram_ppl'))})",
                     fixed(zoo.get("tokens_per_s"), 0)])
    for name, rows_ in logs.items():
        last = rows_[-1]
        m = metas.get(name, {})
        rows.append([f"student {name}", count(last.get("tokens")), count(last.get("step")),
                     sig(m.get("compression"), 4) + "x" if m.get("compression") else "",
                     f"KL {sig(last.get('kl'))}, CE {sig(last.get('ce'))}", fixed(m.get("tokens_per_s"), 0)])
    out += [table(rows, ["model", "tokens", "steps", "compression", "final", "tokens/s"])]
    return "\n".join(out)
