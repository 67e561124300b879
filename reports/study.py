"""The Optuna search (study.db, written by `dfplan search --solver tpe|nsga2|all`), drawn with
Optuna's own matplotlib visualisation: the optimisation history of a single-objective (TPE)
study, the bytes-vs-KL Pareto front of a two-objective (NSGA-II) one.

The database is opened from a temporary copy: Optuna's storage layer may write (journal mode,
schema checks) and a report must never change the run it reads.
"""
from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path

from dfplan.errors import DfplanError

from .context import Context, pyplot
from .fmt import count, missing, sig, table

STUDY = "study.db"


def _studies(path: Path):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="dfplan-report-") as tmp:
        copy = Path(tmp) / "study.db"
        shutil.copyfile(path, copy)
        for side in ("-wal", "-shm"):       # WAL mode: recent trials may live in the journal
            if Path(f"{path}{side}").is_file():
                shutil.copyfile(f"{path}{side}", f"{copy}{side}")
        url = f"sqlite:///{copy}"
        try:
            summaries = optuna.get_all_study_summaries(storage=url, include_best_trial=False)
            studies = [optuna.load_study(study_name=s.study_name, storage=url) for s in summaries]
            for s in studies:          # read everything before the copy goes away
                s.trials  # noqa: B018
        except Exception as e:        # sqlalchemy / optuna raise many types for a bad file
            raise DfplanError(f"{path} is corrupt (not an Optuna study database: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); rerun `dfplan search` "
                              f"or delete it") from None
        return [(s.study_name, s.directions, s.trials) for s in studies]


def _figure(ctx: Context, name: str, directions, trials, idx: str) -> str:
    import optuna
    from optuna.visualization import matplotlib as ovm
    plt = pyplot()
    study = optuna.create_study(directions=directions, study_name=name)
    study.add_trials(trials)
    with warnings.catch_warnings(), plt.style.context("default"):
        warnings.simplefilter("ignore")      # Optuna marks its matplotlib backend experimental
        if len(directions) == 1:
            ax = ovm.plot_optimization_history(study, target_name="KL")
        else:
            ax = ovm.plot_pareto_front(study, target_names=["bytes", "KL"])
        fig = ax.figure
        fig.set_size_inches(7, 4)
        ax.set_title(f"Optuna {'optimisation history' if len(directions) == 1 else 'Pareto front'}: "
                     f"predicted KL per trial")
        return ctx.save(fig, f"optuna_{idx}", f"Optuna study {name}")


def render(ctx: Context) -> str:
    from optuna.trial import TrialState
    out = ["## Optuna search", ""]
    found = False
    for v in ctx.variants:
        rel = v.rel(STUDY)
        if not ctx.run.has(rel):
            continue
        found = True
        studies = _studies(ctx.run.path(rel))
        ctx.run.use(rel, "Optuna studies")
        for i, (name, directions, trials) in enumerate(studies):
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            feas = [t for t in done if (t.user_attrs.get("dfplan") or {}).get("bytes", 0) <= (ctx.plans[v.name].budget_bytes or 0)]
            best = min(feas, key=lambda t: t.user_attrs["dfplan"]["kl"], default=None)
            out += [f"### {v.name}: {name} ({len(done)} trials, {'TPE' if len(directions) == 1 else 'NSGA-II'})", ""]
            if done:
                out += [_figure(ctx, name, directions, done,
                                                f"{v.name}_{i}"), ""]
            rows = [["complete trials", count(len(done))], ["within budget", count(len(feas))],
                    ["best KL within budget", sig(best.user_attrs["dfplan"]["kl"]) if best else "n/a"],
                    ["its bytes", count(best.user_attrs["dfplan"]["bytes"]) if best else "n/a"]]
            out += [table(rows, ["", ""]), ""]
        if not studies:
            out.append(f"`{rel}` holds no study.")
    if not found:
        out.append(missing(STUDY, "dfplan search --solver tpe", "only the exact MILP ran"))
    return "\n".join(out).rstrip()
