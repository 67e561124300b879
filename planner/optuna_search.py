"""Optuna search over the same space: TPE (single objective) and NSGA-II (bytes x KL front).

One categorical parameter per unit (its format name). The budget is a constraint,
trial.set_constraint("budget", bytes - budget) (<= 0 is feasible), which TPE and NSGA-II both
honour. Warm starts are enqueued first (`dfplan search` passes the MILP optimum, MILP front
points and uniform allocations under the budget: on a large model random plans almost never
fit a tight budget), each skipped when the study already holds it.

Objectives: "predicted" scores a plan with the surrogate (cheap; the MILP is exact for it, so
Optuna can at best tie); "measured" calls an evaluator that applies the plan to a copy of the
teacher and measures KL on held-out windows, which is not additive and is why a black-box
search is useful at all.

Persistence: studies live in an Optuna RDB storage (SQLite file in the run directory by
default, any SQLAlchemy URL such as postgresql://... with --storage) under a name derived from
everything that defines the problem (model, candidates, scores, budget, objective, sampler),
so rerunning the same command resumes the study and several machines pointed at one storage
work on one study. `n_trials` is the total the study should reach: a rerun only runs the rest.
Stale RUNNING trials of a killed process are failed by Optuna's heartbeat on resume.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from dfplan.errors import DfplanError

from .space import SearchSpace
from .surrogate import Surrogate

SAMPLERS = ("tpe", "nsga2")
OBJECTIVES = ("predicted", "measured")
_ATTR = "dfplan"        # user attribute holding a trial's bytes and KL


@dataclass(frozen=True)
class TrialRecord:
    number: int
    assignment: dict            # unit -> spec name
    total_bytes: int
    predicted_kl: float
    additive_kl: float
    value: float                # the objective's KL (predicted or measured)
    measured: bool
    feasible: bool


@dataclass(frozen=True)
class SearchResult:
    sampler: str
    objective: str
    study_name: str
    storage: str
    best: TrialRecord | None            # lowest KL among feasible trials
    trials: list = field(default_factory=list)   # TrialRecord per COMPLETE trial
    n_new: int = 0                      # trials run by this call
    seconds: float = 0.0

    @property
    def n_trials(self) -> int:
        return len(self.trials)

    def front(self) -> list[TrialRecord]:
        """Feasible trials not dominated in (bytes, KL), sorted by bytes."""
        pts = sorted((t for t in self.trials if t.feasible), key=lambda t: (t.total_bytes, t.value))
        out, best = [], math.inf
        for t in pts:
            if t.value < best:
                out.append(t)
                best = t.value
        return out

    def summary(self) -> dict:
        b = self.best
        return {"sampler": self.sampler, "objective": self.objective, "study": self.study_name,
                "storage": redact_url(self.storage), "n_trials": self.n_trials, "n_new": self.n_new,
                "n_feasible": sum(t.feasible for t in self.trials), "seconds": round(self.seconds, 3),
                "best": None if b is None else {"trial": b.number, "bytes": b.total_bytes, "kl": b.value,
                                                 "predicted_kl": b.predicted_kl, "measured": b.measured}}


def redact_url(url: str) -> str:
    """Hide a password in an RDB URL before it goes into a plan or a log."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def study_name(space: SearchSpace, sur: Surrogate, budget: int, sampler: str, objective: str,
               extra: Mapping | None = None) -> str:
    """Stable name from the problem's definition: same inputs, same study (so reruns resume)."""
    h = hashlib.sha256()
    # the config's content, not its name (a directory name), so machines sharing a study agree
    h.update(json.dumps({"model": space.cfg.to_dict(), "default": space.default.name, "fixed": space.fixed_bytes,
                         "units": [[u.unit.name, list(u.names), list(u.nbytes)] for u in space.units],
                         "budget": budget, "sampler": sampler, "objective": objective,
                         "extra": dict(extra or {})}, sort_keys=True).encode())
    h.update(json.dumps(sur.kl, sort_keys=True).encode())
    h.update(json.dumps(sur.correction.to_dict(), sort_keys=True).encode())
    return f"dfplan-{sampler}-{objective}-{budget}-{h.hexdigest()[:12]}"


def _quiet_optuna():
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    import warnings
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """An Optuna RDB storage; a file that is not an Optuna database -> DfplanError.
    "memory" gives a non-persistent in-process storage (benchmarks, throwaway searches)."""
    optuna = _quiet_optuna()
    if url == "memory":
        return optuna.storages.InMemoryStorage()
    kw = {}
    if url.startswith("sqlite:///"):
        from pathlib import Path
        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    try:
        st = _rdb_storage(optuna, url, kw)
        if url.startswith("sqlite:///") and ":memory:" not in url:
            _fast_sqlite(st.engine)
        return st
    except Exception as e:   # sqlalchemy DatabaseError, ArgumentError, version mismatch, ...
        raise DfplanError(f"cannot open the study storage {redact_url(url)}: {_first_line(e)}; if it is a "
                          f"corrupt study.db, delete it (the search starts over) or pass another --storage") from None


def _rdb_storage(optuna, url: str, kw: dict, attempts: int = 6):
    """RDBStorage, retried when workers starting together on an empty database race to create
    Optuna's tables (PostgreSQL answers the loser with a unique-key violation)."""
    import random

    import sqlalchemy.exc
    for i in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **kw)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if i == attempts - 1:
                raise
            time.sleep(0.2 * (i + 1) + random.random() * 0.3)


def _fast_sqlite(engine) -> None:
    """WAL journal + synchronous=NORMAL: each Optuna write is a transaction, and with the
    default rollback journal every one waits for an fsync (~1 s per trial on slow disks).
    WAL stays consistent after a crash; at worst the last trials are lost, and they rerun."""
    from sqlalchemy import event

    def on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
    event.listen(engine, "connect", on_connect)
    engine.dispose()        # connections opened before the listener get replaced


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def _make_sampler(kind: str, seed: int):
    optuna = _quiet_optuna()
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    raise DfplanError(f"unknown sampler {kind!r}; choose one of {', '.join(SAMPLERS)}")


def load_study(storage, name: str, sampler_kind: str, seed: int = 0):
    optuna = _quiet_optuna()
    directions = ["minimize"] if sampler_kind == "tpe" else ["minimize", "minimize"]
    try:
        return optuna.create_study(storage=storage, study_name=name, directions=directions,
                                   sampler=_make_sampler(sampler_kind, seed), load_if_exists=True)
    except DfplanError:
        raise
    except Exception as e:
        raise DfplanError(f"cannot open study {name}: {_first_line(e)}; delete the study database "
                          f"or pass another --storage") from None


def _record(t, space: SearchSpace, budget: int) -> TrialRecord | None:
    ua = t.user_attrs.get(_ATTR)
    if t.values is None or not isinstance(ua, dict):
        return None
    value = float(ua.get("kl", t.values[-1]))
    return TrialRecord(t.number, {k: str(v) for k, v in t.params.items()}, int(ua["bytes"]),
                       float(ua["predicted_kl"]), float(ua["additive_kl"]), value,
                       bool(ua.get("measured", False)), int(ua["bytes"]) <= budget)


def run_search(space: SearchSpace, sur: Surrogate, budget: int, *, sampler: str = "tpe", n_trials: int = 200,
               storage: str, name: str | None = None, objective: str = "predicted",
               evaluator: Callable[[dict], float] | None = None,
               warm_starts: Sequence[Mapping] = (), seed: int = 0, progress: bool = True) -> SearchResult:
    """Run (or resume) a study until it holds `n_trials` complete trials; -> SearchResult."""
    optuna = _quiet_optuna()
    from optuna.trial import TrialState

    if objective not in OBJECTIVES:
        raise DfplanError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "measured" and evaluator is None:
        raise DfplanError("--objective measured needs a model with weights and a --corpus")
    if n_trials < 0:
        raise DfplanError(f"--trials must be >= 0, got {n_trials}")
    space.check_budget(budget)
    name = name or study_name(space, sur, budget, sampler, objective)
    st = open_storage(storage)
    study = load_study(st, name, sampler, seed)
    t0 = time.perf_counter()

    try:
        for ws in warm_starts:
            params = {u.unit.name: (ws[u.unit.name] if isinstance(ws[u.unit.name], str) else ws[u.unit.name].name)
                      for u in space.units}
            study.enqueue_trial(params, skip_if_exists=True)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    except Exception as e:
        raise DfplanError(f"study {name} in {redact_url(storage)} is unreadable: {_first_line(e)}; delete it "
                          f"or pass another --storage") from None

    cache: dict[tuple, float] = {}

    def objective_fn(trial):
        assignment = {u.unit.name: trial.suggest_categorical(u.unit.name, list(u.names)) for u in space.units}
        nbytes = space.total_bytes(assignment)
        additive = sur.additive(assignment)
        predicted = sur.correction(additive)
        trial.set_constraint("budget", float(nbytes - budget))
        kl, measured = predicted, False
        if objective == "measured" and nbytes <= budget:
            key = tuple(assignment[u.unit.name] for u in space.units)
            if key not in cache:
                cache[key] = float(evaluator(assignment))
            kl, measured = cache[key], True
        # one attribute, one storage write
        trial.set_user_attr(_ATTR, {"bytes": nbytes, "additive_kl": additive, "predicted_kl": predicted,
                                    "kl": kl, "measured": measured})
        return kl if sampler == "tpe" else (float(nbytes), kl)

    n_new = max(0, n_trials - done)
    if n_new:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_new, desc=f"{sampler} trials", unit="trial", disable=not progress)

        def tick(study_, trial_):
            bar.update(1)
            b = trial_.user_attrs.get(_ATTR)
            if b:
                bar.set_postfix(kl=f"{b['kl']:.4g}", MB=f"{b['bytes'] / 1e6:.2f}")
        try:
            # MaxTrialsCallback counts the whole study, so workers sharing it stop at n_trials together
            stop = optuna.study.MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))
            study.optimize(objective_fn, n_trials=n_new, callbacks=[tick, stop], gc_after_trial=False,
                           catch=())
        except DfplanError:
            raise
        except Exception as e:
            import sqlalchemy.exc
            if isinstance(e, sqlalchemy.exc.SQLAlchemyError):
                raise DfplanError(f"study storage {redact_url(storage)} failed: {_first_line(e)}") from None
            raise
        finally:
            bar.close()

    records = [r for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if (r := _record(t, space, budget)) is not None]
    feas = [r for r in records if r.feasible]
    best = min(feas, key=lambda r: (r.value, r.total_bytes)) if feas else None
    return SearchResult(sampler, objective, name, storage, best, records, n_new, time.perf_counter() - t0)
