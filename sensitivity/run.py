"""`dfplan sensitivity`: model + corpus -> sensitivity table files, in one or many processes."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from dfplan import distributed as D
from dfplan.data import VALID_FRACTION
from dfplan.errors import DfplanError
from dfplan.loading import load_any, load_model
from dfplan.tokenizer import load_tokenizer

from .analyzer import SensitivityResult, analyze, auto_batch_tokens, merge
from .calib import calibration_windows, corpus_tokens
from .jobs import AnalyzerConfig, parse_candidates
from .provenance import config_hash, git_commit, model_fingerprint, versions, windows_hash
from .resume import PartialStore
from .table import BLOCK_COLUMNS, UNIT_COLUMNS, frame, output_paths, write_tables


@dataclass(frozen=True)
class RunOptions:
    model: str
    corpus: tuple
    out: str
    tokenizer: str | None = None
    candidates: str = "default"
    windows: int = 32
    seq_len: int = 256
    seed: int = 0
    batch_windows: int = 8
    max_batch_tokens: int = 0
    blocks: bool = True
    units: tuple = ()
    nproc: int = 1
    threads: int | None = None
    restart: bool = False
    random_init: bool = False
    device: str = "cpu"
    progress: bool = True


def load_teacher(model_arg: str, random_init: bool = False, seed: int = 0, device: str = "cpu"):
    if random_init:
        return load_model(model_arg, random_init=True, seed=seed, device=device)
    model, tok = load_any(model_arg, device=device)
    return model.to(device), tok


def load_text_tokenizer(tok, tokenizer_arg: str | None, model_arg: str):
    if tokenizer_arg:
        return load_tokenizer(tokenizer_arg)
    if tok is None:
        raise DfplanError(f"{model_arg} has no tokenizer.json; pass --tokenizer (a tokenizer.json or hub id)")
    return tok


def run_sensitivity(opts: RunOptions) -> dict:
    """Compute and write the table; -> the provenance dict written to sensitivity.json."""
    output_paths(opts.out)                      # bad --out fails before any work
    parse_candidates(opts.candidates)           # unknown formats fail before loading anything
    if opts.nproc > 1 and D.rank_world()[1] == 1 and int(__import__("os").environ.get("WORLD_SIZE", "1")) <= 1:
        if opts.device.startswith("cuda"):
            raise DfplanError("--nproc spawns CPU (gloo) workers; on GPUs launch with torchrun --nproc_per_node N")
        return D.spawn(_run_rank, (opts,), opts.nproc, opts.threads)
    created = D.init_from_env(opts.device)
    try:
        if opts.threads:
            torch.set_num_threads(opts.threads)
        return _run_rank(opts)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _device(opts: RunOptions) -> str:
    if opts.device.startswith("cuda") and D.rank_world()[1] > 1 and ":" not in opts.device:
        return f"cuda:{torch.cuda.current_device()}"
    return opts.device


def _run_rank(opts: RunOptions) -> dict:
    t0 = time.perf_counter()
    rank, world = D.rank_world()
    paths = output_paths(opts.out)
    model, tok = load_teacher(opts.model, opts.random_init, opts.seed, _device(opts))
    tok = load_text_tokenizer(tok, opts.tokenizer, opts.model)
    stream = corpus_tokens(opts.corpus, tok, model.config)
    windows = calibration_windows(stream.tokens, opts.windows, opts.seq_len, opts.seed)
    cfg = AnalyzerConfig(candidates=parse_candidates(opts.candidates), batch_windows=opts.batch_windows,
                         max_batch_tokens=opts.max_batch_tokens, blocks=opts.blocks, units=tuple(opts.units),
                         seed=opts.seed)
    calib = {"corpus": list(stream.files), "token_stream_key": stream.key, "n_corpus_tokens": len(stream),
             "windows": int(windows.shape[0]), "seq_len": opts.seq_len, "seed": opts.seed,
             "valid_fraction": VALID_FRACTION, "sampling": "distinct train-split windows",
             "windows_sha256": windows_hash(windows)}
    fp = model_fingerprint(model)
    key = {"format": 1, "model_sha256": fp, "windows_sha256": calib["windows_sha256"], "analyzer": cfg.key()}
    store = PartialStore(paths["partial"], key)
    err = None
    resumed = 0
    if rank == 0:
        try:
            resumed = store.prepare(opts.restart)
        except DfplanError as e:
            err = str(e)
    err = D.broadcast_error(err)
    if err:
        raise DfplanError(err)
    D.barrier()
    results, tbf, jobs, skipped = analyze(model, windows, cfg, rank=rank, world=world, store=store,
                                          progress=opts.progress and rank == 0)
    parts = D.gather_to_all((results, tbf))
    prov = None
    if rank == 0:
        res = merge([r for rs, _ in parts for r in rs], jobs, sum(t for _, t in parts), model.config.n_layer,
                    skipped, resumed=resumed, wall_s=time.perf_counter() - t0, world=world)
        prov = _provenance(opts, model, fp, calib, cfg, res)
        calib_short = calib["windows_sha256"][:12]
        write_tables(opts.out, frame(res.rows, UNIT_COLUMNS, calib_short),
                     frame(res.block_rows, BLOCK_COLUMNS, calib_short), prov)
        store.remove()
    D.barrier()
    return prov


def _provenance(opts: RunOptions, model, fp: str, calib: dict, cfg: AnalyzerConfig, res: SensitivityResult) -> dict:
    mcfg = model.config
    return {
        "format": "dfplan-sensitivity", "version": 1,
        "model": {"arg": opts.model, "random_init": opts.random_init, "config": mcfg.to_dict(),
                  "config_sha256": config_hash(mcfg), "weights_sha256": fp,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")},
        "calibration": calib,
        "analyzer": {**cfg.key(), "max_batch_tokens_effective": cfg.max_batch_tokens or auto_batch_tokens(mcfg)},
        "cost": {"wall_s": round(res.wall_s, 3), "block_forwards": res.block_forwards,
                 "teacher_block_forwards": res.teacher_block_forwards,
                 "full_forward_block_equivalent": res.full_forward_equivalent,
                 "jobs": res.n_jobs, "resumed_jobs": res.resumed_jobs, "processes": res.world_size,
                 "unit_rows": len(res.rows), "block_rows": len(res.block_rows)},
        "skipped": res.skipped,
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "git_commit": git_commit(),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
