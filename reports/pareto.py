"""Pareto front: bytes vs predicted KL (the MILP front), uniform plans and the chosen plans marked,
with every measured KL the run has (search --validate, the untrained plan and the distilled
student from distill's eval.json)."""
from __future__ import annotations

from . import commands
from .context import Context, pyplot
from .fmt import count, mb, missing, sig, table

FRONT = "pareto.csv"
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


def _short(name: str) -> str:
    return name.split(" (")[0]


def measured_points(ctx: Context, v, plan) -> list[tuple[str, float, float]]:
    """(label, bytes, measured KL) of one plan variant: what the run measured on real text."""
    pts = []
    prov = plan.provenance or {}
    for r in prov.get("validation") or []:
        if r.get("plan") != "chosen":
            pts.append((f"validated: {r.get('plan')}", r.get("bytes"), r.get("measured_kl")))
    ev = ctx.run.json(v.rel("student/eval.json"), "measured KL of the plan (untrained and distilled)")
    nbytes = plan.predicted_bytes
    if prov.get("measured_kl") is not None:
        pts.append((f"{v.name}: measured (search)", nbytes, prov["measured_kl"]))
    if ev:
        for key, label in (("ptq", "plan applied, untrained"), ("student", "distilled student")):
            kl = (ev.get(key) or {}).get("kl_to_teacher")
            if kl is not None:
                pts.append((f"{v.name}: {label}", nbytes, kl))
    return pts


def figure(ctx: Context, fronts: dict, plans: dict, measured: dict, prior: bool) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    ylab = "pseudo-KL (size-only prior)" if prior else "KL(teacher || plan), nats/token"
    for (name, front), ls in zip(fronts.items(), ("-", "--", "-.", ":")):
        ax.plot(front["bytes"] / 1e6, front["predicted_kl"].clip(lower=1e-9), ls, marker="o", ms=3, color="0.35",
                label="MILP Pareto front (predicted)" + (f": {name}" if len(fronts) > 1 else ""))
    main = next(iter(plans.values()), None)
    uni = ((main.provenance or {}).get("uniform") or []) if main is not None else []
    if uni:
        ax.scatter([u["bytes"] / 1e6 for u in uni], [max(u["predicted_kl"], 1e-9) for u in uni], marker="s",
                   facecolor="none", edgecolor="tab:gray", s=30, label="uniform plans (predicted)")
        for u in uni:
            ax.annotate(_short(u["name"]), (u["bytes"] / 1e6, max(u["predicted_kl"], 1e-9)), fontsize=6.5,
                        xytext=(3, 3), textcoords="offset points", color="0.3")
    for (name, plan), col in zip(plans.items(), COLORS):
        if plan.predicted_bytes is None or plan.predicted_kl is None:
            continue
        ax.scatter([plan.predicted_bytes / 1e6], [max(plan.predicted_kl, 1e-9)], marker="*", s=160, color=col,
                   edgecolor="black", zorder=5, label=f"chosen: {name} (predicted)")
        if plan.budget_bytes:
            ax.axvline(plan.budget_bytes / 1e6, color=col, ls=":", lw=1, label=f"budget: {name}")
        for (label, b, kl), mk in zip(measured.get(name, []), ("D", "d", "o", "v", "^", "P")):
            if b is None or kl is None:
                continue
            filled = "distilled" in label
            ax.scatter([b / 1e6], [max(kl, 1e-9)], marker=mk, s=40, color=col if filled else "none",
                       edgecolor=col, zorder=4, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("model bytes (MB, 10^6)")
    ax.set_ylabel(ylab)
    ax.set_title("Bytes vs KL: predicted front, uniform plans, chosen and measured")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return ctx.save(fig, "pareto_front", "Pareto front")


def render(ctx: Context) -> str:
    out = ["## Pareto front", ""]
    if not ctx.plans:
        return "\n".join(out + [missing("plan.json", "dfplan search", "the chosen plan and the uniform plans")])
    v0 = ctx.variants[0]
    front = ctx.run.csv(v0.rel(FRONT), "Pareto front (bytes vs predicted KL)",
                        required=("bytes", "predicted_kl"))
    measured = {v.name: measured_points(ctx, v, ctx.plans[v.name]) for v in ctx.variants}
    main = ctx.plans[v0.name]
    prior = (main.provenance or {}).get("scores") == "prior"
    lines = []
    fronts = {} if front is None or not len(front) else {v0.name: front}
    if front is None:
        lines.append(missing(v0.rel(FRONT), "dfplan search", "the MILP front"))
    for v in ctx.variants[1:]:
        f = ctx.run.csv(v.rel(FRONT), "Pareto front (bytes vs predicted KL)", required=("bytes", "predicted_kl"))
        if f is None or not len(f):
            continue
        if front is not None and f[["bytes", "predicted_kl"]].equals(front[["bytes", "predicted_kl"]]):
            lines.append(f"`{v.rel(FRONT)}` is the same front as `{v0.rel(FRONT)}` (same sensitivity table).")
        else:
            fronts[v.name] = f
            lines.append(f"`{v.rel(FRONT)}` differs from `{v0.rel(FRONT)}`: both are drawn.")
    out += [figure(ctx, fronts, ctx.plans, measured, prior), ""]
    sens = ctx.path_arg("sensitivity.csv")
    out += [ctx.reproduce(*[commands.search(ctx.run.json(v.rel("plan.json"), "plan") or {},
                                            ctx.path_arg(v.prefix.rstrip("/")) if v.prefix else ctx.run_arg,
                                            sens)
                            for v in ctx.variants]), ""]
    out += lines
    rows = []
    for v in ctx.variants:
        p = ctx.plans[v.name]
        rows.append([f"chosen: {v.name}", count(p.predicted_bytes), sig(p.predicted_kl)])
        for label, b, kl in measured[v.name]:
            rows.append([label, count(b), sig(kl)])
    for u in (main.provenance or {}).get("uniform") or []:
        rows.append([f"uniform {u['name']}", count(u["bytes"]), sig(u["predicted_kl"])])
    out += ["Plans on the figure (predicted KL, or measured where the label says so):", "",
            table(rows, ["plan", "bytes", "KL"]), ""]
    if front is not None and len(front):
        frows = [[count(r.bytes), mb(r.bytes), sig(r.predicted_kl), str(getattr(r, "formats", ""))]
                 for r in front.itertuples()]
        out += [f"MILP front ({FRONT}):", "", table(frows, ["bytes", "MB", "predicted KL", "formats"]), ""]
    return "\n".join(out).rstrip()
