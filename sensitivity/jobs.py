"""What the analyzer has to score: one job per compressible unit (all its candidate specs)
and one per block (all units of the block at one spec), in a fixed canonical order.

The order, the spec list of each job and the way specs are grouped into batched passes
depend only on the model config and the analyzer settings, never on the number of
processes, so a sharded run computes exactly what a single process computes.
"""
from __future__ import annotations

import fnmatch
import zlib
from dataclasses import dataclass, field

import torch.nn as nn

from dfplan.errors import DfplanError
from dfplan.formats.specs import DEFAULT_CANDIDATES, Spec, parse_spec
from dfplan.formats.units import Unit, allowed_specs, compressible_units


@dataclass(frozen=True)
class AnalyzerConfig:
    candidates: tuple = DEFAULT_CANDIDATES
    batch_windows: int = 8            # calibration windows per micro-batch
    max_batch_tokens: int = 0         # candidates x windows x tokens in one batched pass; 0 = auto
    blocks: bool = True               # also score whole blocks (every unit of a block at one spec)
    units: tuple = ()                 # fnmatch patterns over unit names; empty = every unit
    seed: int = 0                     # calibration seed, recorded in every row

    def __post_init__(self):
        if not self.candidates:
            raise DfplanError("no candidate formats given; pass --candidates default or a list such as bin,int4,fp16")
        if self.batch_windows < 1 or self.max_batch_tokens < 0:
            raise DfplanError("batch_windows must be positive and max_batch_tokens >= 0 (0 = auto)")

    def key(self) -> dict:
        """Everything that changes a number in the table (for resume checks and provenance)."""
        return {"candidates": [str(s) for s in self.candidates], "batch_windows": self.batch_windows,
                "max_batch_tokens": self.max_batch_tokens, "blocks": self.blocks,
                "units": list(self.units), "seed": self.seed}


def parse_candidates(text: str | None) -> tuple[Spec, ...]:
    """'default' or a comma-separated list of format names (parse_spec raises on unknown ones)."""
    if text is None or text.strip().lower() in ("", "default"):
        return DEFAULT_CANDIDATES
    out: list[Spec] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.lower() == "default":
            out.extend(DEFAULT_CANDIDATES)
        else:
            try:
                out.append(parse_spec(part))
            except DfplanError as e:
                raise DfplanError(f"candidate {part!r} is not a format dfplan knows: {e}") from None
    if not out:
        raise DfplanError(f"--candidates {text!r} names no format")
    return tuple(dict.fromkeys(out))           # drop repeats, keep order


@dataclass(frozen=True)
class Job:
    id: str                     # "unit:<fqn>" or "block:<i>"
    kind: str                   # "unit" | "block"
    block: int                  # layer index (-1 embedding, n_layer untied lm_head)
    units: tuple                # Unit objects compressed together
    specs: tuple                # candidate specs, canonical order
    start: int                  # first block to run (0 with a fresh embedding pass for the embedding)
    order: int                  # position in the canonical job list
    spec_order: tuple = field(default=())   # index of each spec in the candidate list

    @property
    def needs_embedding(self) -> bool:
        return any(u.kind == "embedding" for u in self.units)

    def cost(self, n_layer: int) -> int:
        """Block-forwards this job costs (the head counted as one)."""
        return len(self.specs) * (n_layer - self.start + 1)


def job_seed(seed: int, unit: str, spec: Spec) -> int:
    """Per (unit, spec) seed for randomised inits (stable across processes and runs)."""
    return (seed * 1_000_003 + zlib.crc32(f"{unit}|{spec}".encode())) & 0x7FFFFFFF


def _float_weight(model: nn.Module, unit: Unit) -> str | None:
    """None when `unit` is an uncompressed float module of the right shape, else why not."""
    try:
        mod = model.get_submodule(unit.name)
    except AttributeError:
        return "missing from the model"
    w = getattr(mod, "weight", None)
    if not (hasattr(w, "is_floating_point") and w.is_floating_point() and w.dim() == 2):
        return f"already compressed ({type(mod).__name__})"
    if tuple(w.shape) != tuple(unit.shape):
        return f"weight shape {tuple(w.shape)} differs from the config's {unit.shape}"
    if unit.kind == "embedding" and not hasattr(mod, "attend") and model.config.tie_embeddings:
        return f"tied embedding module {type(mod).__name__} has no attend()"
    return None


def select_units(model: nn.Module, patterns: tuple = ()) -> list[Unit]:
    units = compressible_units(model.config)
    if patterns:
        units = [u for u in units if any(fnmatch.fnmatchcase(u.name, p) for p in patterns)]
        if not units:
            raise DfplanError(f"--units {', '.join(patterns)} matches no compressible unit of this model; "
                              "unit names look like backbone.layers.0.mixer.in_proj or backbone.embedding")
    usable, why = [], {}
    for u in units:
        reason = _float_weight(model, u)
        if reason is None:
            usable.append(u)
        else:
            why[u.name] = reason
    if not usable:
        sample = "; ".join(f"{k}: {v}" for k, v in list(why.items())[:3])
        raise DfplanError("the model has no compressible float units (every in_proj/out_proj/embedding "
                          f"is missing or already compressed: {sample or 'none defined'}); "
                          "run sensitivity on the uncompressed teacher checkpoint")
    return usable


def plan_jobs(model: nn.Module, cfg: AnalyzerConfig) -> tuple[list[Job], list[dict]]:
    """-> (jobs in canonical order, skipped (unit, spec) pairs with the reason)."""
    n_layer = model.config.n_layer
    units = select_units(model, cfg.units)
    cands = list(cfg.candidates)
    jobs: list[Job] = []
    skipped: list[dict] = []
    used = [False] * len(cands)

    def fits(unit: Unit, k: int) -> bool:
        ok = allowed_specs(unit)(cands[k])
        if not ok:
            skipped.append({"unit": unit.name, "spec": str(cands[k]),
                            "reason": "format not allowed for this unit kind" if unit.kind in ("embedding", "lm_head")
                            else "format does not fit the weight shape"})
        return ok

    for u in units:
        ks = [k for k in range(len(cands)) if fits(u, k)]
        for k in ks:
            used[k] = True
        if not ks:
            continue
        start = 0 if u.kind == "embedding" else u.block
        jobs.append(Job(f"unit:{u.name}", "unit", u.block, (u,), tuple(cands[k] for k in ks), start,
                        len(jobs), tuple(ks)))
    unused = [str(cands[k]) for k in range(len(cands)) if not used[k]]
    if unused:
        raise DfplanError(f"candidate format(s) {', '.join(unused)} fit no unit of this model "
                          "(a group or rank larger than the weights allow?); drop them from --candidates")
    if cfg.blocks:
        for i in range(n_layer):
            bu = tuple(u for u in units if u.block == i)
            if not bu:
                continue
            ks = [k for k in range(len(cands)) if all(allowed_specs(u)(cands[k]) for u in bu)]
            if ks:
                jobs.append(Job(f"block:{i}", "block", i, bu, tuple(cands[k] for k in ks), i,
                                len(jobs), tuple(ks)))
    return jobs, skipped


def spec_groups(job: Job, batch_windows: int, seq_len: int, max_batch_tokens: int) -> list[tuple[int, ...]]:
    """Indices into job.specs, chunked so one batched pass holds at most max_batch_tokens rows."""
    per = max(1, max_batch_tokens // max(1, batch_windows * seq_len))
    n = len(job.specs)
    return [tuple(range(s, min(n, s + per))) for s in range(0, n, per)]


def shard(jobs: list[Job], world: int, rank: int, n_layer: int) -> list[Job]:
    """Longest-processing-time assignment of jobs to ranks: deterministic, balanced by cost."""
    if world <= 1:
        return list(jobs)
    load = [0] * world
    mine = []
    for job in sorted(jobs, key=lambda j: (-j.cost(n_layer), j.order)):
        r = min(range(world), key=lambda x: (load[x], x))
        load[r] += job.cost(n_layer)
        if r == rank:
            mine.append(job)
    return sorted(mine, key=lambda j: j.order)
