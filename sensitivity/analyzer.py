"""Forward-only KL sensitivity: compress one unit (or one whole block) at a time and measure
how far the next-token distribution moves from the teacher's on the calibration windows.

Cost model: the teacher runs once and its block-input streams are cached (cache.py); a
candidate for a unit of block i runs blocks i..L-1 + head from that cache, and all
candidates of a job that fit in `max_batch_tokens` share one batched pass (swap.py). The
tied embedding feeds block 0 and is the head, so its candidates run a full forward.
No gradients anywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from dfplan.formats.quant import fake_quant
from dfplan.formats.units import unit_index

from .cache import TeacherCache, stream_into
from .jobs import AnalyzerConfig, Job, job_seed, plan_jobs, shard, spec_groups
from .metrics import LogitSums, SqnrSums, TeacherTerms
from .swap import MultiEmbedding, MultiLinear, swapped

# Bytes one batched pass may spend on its widest activations (logits and their softmaxes,
# the in_proj output) when max_batch_tokens is left to "auto".
AUTO_PASS_BYTES = 2 << 30


def auto_batch_tokens(cfg) -> int:
    per_token = 4 * (3 * cfg.vocab_size + 4 * max(cfg.d_in_proj, cfg.d_model))
    return max(1, AUTO_PASS_BYTES // per_token)


@dataclass
class JobResult:
    job_id: str
    rows: list                     # one dict per spec
    block_forwards: int            # candidate block-forwards spent (head not counted)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return {"job_id": self.job_id, "rows": self.rows, "block_forwards": self.block_forwards,
                "wall_s": self.wall_s}

    @classmethod
    def from_dict(cls, d: dict) -> "JobResult":
        return cls(d["job_id"], list(d["rows"]), int(d["block_forwards"]), float(d.get("wall_s", 0.0)))


@dataclass
class SensitivityResult:
    rows: list                     # per (unit, spec), canonical order
    block_rows: list               # per (block, spec)
    block_forwards: int            # candidate block-forwards + the teacher's cache passes
    teacher_block_forwards: int
    full_forward_equivalent: int   # block-forwards the same candidates need without the cache
    n_jobs: int
    resumed_jobs: int = 0
    wall_s: float = 0.0
    world_size: int = 1
    skipped: list = field(default_factory=list)


def _weights(module, unit_name: str, specs, seed: int) -> list[torch.Tensor]:
    w = module.weight.detach()
    out = []
    for s in specs:
        g = torch.Generator().manual_seed(job_seed(seed, unit_name, s))
        out.append(fake_quant(w, s, generator=g).to(dtype=w.dtype, device=w.device))
    return out


def _replacements(model, job: Job, specs, seed: int, sqnr):
    reps = {}
    for u in job.units:
        mod = model.get_submodule(u.name)
        ws = _weights(mod, u.name, specs, seed)
        ref = mod.weight.detach()
        if u.kind == "embedding":
            reps[u.name] = MultiEmbedding(ws, ref, sqnr)
        else:
            reps[u.name] = MultiLinear(ws, mod.bias, ref, sqnr, shared_input=sqnr is not None)
    return reps


@torch.no_grad()
def evaluate_job(model, cache: TeacherCache, job: Job, cfg: AnalyzerConfig, max_batch_tokens: int) -> JobResult:
    t0 = time.perf_counter()
    n_layer, V = cache.n_layer, cache.vocab_size
    rows, block_forwards = [], 0
    for grp in spec_groups(job, cfg.batch_windows, cache.seq_len, max_batch_tokens):
        specs = [job.specs[g] for g in grp]
        K = len(specs)
        sums = [LogitSums() for _ in specs]
        sqnr = [SqnrSums() for _ in specs]
        # unit jobs: SQNR of the unit's own output; block jobs: of the block's output stream
        reps = _replacements(model, job, specs, cfg.seed, sqnr if job.kind == "unit" else None)
        with swapped(model, reps):
            for b in cache.batches:
                nb = b.inputs.shape[0]
                if job.needs_embedding:
                    stream = stream_into(model, 0, model.embed(b.inputs.repeat(K, 1)), None)
                else:
                    stream = b.streams[job.start].repeat(K, 1, 1)         # (K*b, L, d)
                h, r = stream, None
                if job.kind == "block":
                    h, r = model.run_blocks(h, r, job.start, job.start + 1)
                    out = stream_into(model, job.start + 1, h, r)
                    for k in range(K):
                        sqnr[k].add(b.streams[job.start + 1], out[k * nb:(k + 1) * nb])
                    h, r = out, None
                    h, r = model.run_blocks(h, r, job.start + 1, n_layer)
                else:
                    h, r = model.run_blocks(h, r, job.start, n_layer)
                logits = model.head(h, r)[..., :V]                        # (K*b, L, V)
                terms = TeacherTerms(b.logits)
                for k in range(K):
                    sums[k].add(terms, logits[k * nb:(k + 1) * nb], b.targets)
                del logits, terms
        block_forwards += K * (n_layer - job.start)
        for spec, gi, s, q in zip(specs, grp, sums, sqnr):
            rows.append(_row(job, spec, job.spec_order[gi], s.result(), q.db, cache.n_tokens, cfg.seed))
    return JobResult(job.id, rows, block_forwards, time.perf_counter() - t0)


def _row(job: Job, spec, spec_index: int, metrics: dict, sqnr_db: float, n_tokens: int, seed: int) -> dict:
    nbytes = sum(spec.nbytes(u.shape) for u in job.units)
    params = sum(u.numel for u in job.units)
    common = {"spec": str(spec), "bytes": int(nbytes), "params": int(params), **metrics, "sqnr": sqnr_db,
              "n_tokens": int(n_tokens), "seed": int(seed), "_order": job.order, "_spec": spec_index}
    if job.kind == "unit":
        u = job.units[0]
        return {"unit": u.name, "kind": u.kind, "block": u.block, **common}
    return {"block": job.block, "units": len(job.units), **common}


def analyze(model, windows, cfg: AnalyzerConfig = AnalyzerConfig(), *, rank: int = 0, world: int = 1,
            store=None, progress: bool = False, cache: TeacherCache | None = None):
    """Score this process's share of the jobs -> (list[JobResult], teacher block-forwards, jobs, skipped).

    `store` (resume.PartialStore) supplies finished jobs and receives new ones; the caller
    merges the results of all ranks with `merge`.
    """
    model.eval()
    jobs, skipped = plan_jobs(model, cfg)
    done = store.load() if store is not None else {}
    todo = [j for j in jobs if j.id not in done]
    mine = shard(todo, world, rank, model.config.n_layer)
    results = [done[j.id] for j in jobs if j.id in done] if rank == 0 else []
    max_tokens = cfg.max_batch_tokens or auto_batch_tokens(model.config)
    teacher_bf = 0
    if mine:
        if cache is None:
            cache = TeacherCache(model, windows, cfg.batch_windows)
        teacher_bf = cache.block_forwards
        # progress in block-forwards (the head counted as one), so the ETA weighs a block-0 job
        # (the whole suffix) more than a last-block one; the postfix counts jobs
        n_layer = model.config.n_layer
        bar = tqdm(total=sum(j.cost(n_layer) for j in mine), disable=not progress, unit="blk",
                   desc=f"sensitivity[{rank}]" if world > 1 else "sensitivity", dynamic_ncols=True)
        with bar:
            for i, job in enumerate(mine):
                bar.set_postfix_str(f"job {i + 1}/{len(mine)} {job.id}", refresh=False)
                res = evaluate_job(model, cache, job, cfg, max_tokens)
                if store is not None:
                    store.save(res)
                results.append(res)
                bar.update(job.cost(n_layer))
    return results, teacher_bf, jobs, skipped


def merge(results: list[JobResult], jobs: list[Job], teacher_block_forwards: int, n_layer: int,
          skipped: list, resumed: int = 0, wall_s: float = 0.0, world: int = 1) -> SensitivityResult:
    """Job results from every rank -> one result in canonical (unit, spec) order."""
    by_id = {r.job_id: r for r in results}
    missing = [j.id for j in jobs if j.id not in by_id]
    if missing:
        raise RuntimeError(f"sensitivity results missing for {len(missing)} job(s), e.g. {missing[0]}")
    unit_rows, block_rows, bf, full = [], [], 0, 0
    for j in jobs:
        r = by_id[j.id]
        (unit_rows if j.kind == "unit" else block_rows).extend(r.rows)
        bf += r.block_forwards
        full += len(j.specs) * n_layer
    key = lambda row: (row["_order"], row["_spec"])
    return SensitivityResult(sorted(unit_rows, key=key), sorted(block_rows, key=key),
                             bf + teacher_block_forwards, teacher_block_forwards, full, len(jobs),
                             resumed, wall_s, world, skipped)


def run_local(model, windows, cfg: AnalyzerConfig = AnalyzerConfig(), store=None,
              progress: bool = False) -> SensitivityResult:
    """Single-process analysis of every job."""
    t0 = time.perf_counter()
    done = len(store.load()) if store is not None else 0
    results, tbf, jobs, skipped = analyze(model, windows, cfg, store=store, progress=progress)
    return merge(results, jobs, tbf, model.config.n_layer, skipped, resumed=done,
                 wall_s=time.perf_counter() - t0)


def compressed(model, assignment: dict, seed: int = 0):
    """Context manager: the model with each {unit name: spec} compressed at once (the same
    quantised weights the analyzer scores), restored on exit."""
    index = unit_index(model.config)
    reps = {}
    for name, spec in assignment.items():
        mod = model.get_submodule(name)
        (w,) = _weights(mod, name, [spec], seed)
        if index[name].kind == "embedding":
            reps[name] = MultiEmbedding([w])
        else:
            reps[name] = MultiLinear([w], mod.bias)
    return swapped(model, reps)
