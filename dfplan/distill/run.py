"""`dfplan distill` as a library call: teacher + plan + corpus -> packed, verified, evaluated student.

The output folder (`--out`) ends up holding the packed checkpoint (dfplan.packed) plus
  eval.json         held-out perplexity and KL(teacher || model): teacher, the plan applied
                    without training ("ptq"), its scaffold alone ("scaffold_only", corrections
                    dropped) and the distilled student as loaded from the artifact; and the
                    export check (artifact logits vs the trained model's)
  distill.json      what ran: options, schedule, tokens, tokens/s, losses, versions
  train_log.jsonl   the loss curve
While training it holds checkpoint.pt (the final one is kept until the export is published);
the export is written into .export/ and moved in with manifest.json last, so a folder with
a manifest is complete and a run killed during export is finished by a rerun. Every input is
validated before the folder is touched, so bad input leaves nothing behind.
"""
from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import stream_windows
from ..distributed import rank_world
from ..errors import DfplanError
from ..fileio import write_json_atomic
from ..formats.layouts import layout_plan
from ..formats.plan import Plan
from ..formats.specs import Binary
from .trainer import DistillConfig, train, write_log

CHECKPOINT = "checkpoint.pt"
STAGING = ".export"        # the packed student, eval.json and distill.json before publish()
EVAL = "eval.json"
META = "distill.json"



@dataclass(frozen=True)
class DistillJob:
    teacher: str
    plan: str                       # plan.json path or layout:NAME
    corpus: tuple
    out: str
    config: DistillConfig
    glob: str = "*.txt"
    tokenizer: str | None = None
    eval_corpus: tuple = ()         # held-out text for eval.json (default: the corpus' valid split)
    eval_windows: int = 64
    eval_seq_len: int | None = None  # default: config.seq_len
    eval_batch_size: int = 8
    resume: bool = False
    device: str | None = None
    threads: int | None = None
    extra_identity: dict = field(default_factory=dict)


# -- validation, before anything is written -------------------------------------------------

def complete(out: Path) -> bool:
    """A finished distillation: the manifest (published last) and both reports."""
    return all((out / f).is_file() for f in ("manifest.json", EVAL, META))


def check_out_dir(out: Path, resume: bool) -> bool:
    """Refuse an --out that cannot be used; -> whether to resume the run already in it.

    A run whose training finished but whose export was interrupted (STAGING is there) is
    finished without --resume: its final checkpoint holds everything the export needs.
    """
    if out.exists() and not out.is_dir():
        raise DfplanError(f"--out {out} is a file; pass a folder")
    if complete(out):
        raise DfplanError(f"{out} already holds a packed student; choose another --out")
    has_ckpt = (out / CHECKPOINT).exists()
    interrupted_export = has_ckpt and ((out / STAGING).exists() or (out / "manifest.json").exists())
    if (out / "manifest.json").exists() and not has_ckpt:
        raise DfplanError(f"{out} holds a packed student without {EVAL} or {META} and no checkpoint "
                          "to finish it from; choose another --out")
    if has_ckpt and not (resume or interrupted_export):
        raise DfplanError(f"{out} holds an unfinished distillation; pass --resume to continue it "
                          "or choose another --out")
    if out.is_dir() and not (resume or interrupted_export) and any(out.iterdir()):
        raise DfplanError(f"--out {out} exists and is not empty; choose a new folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise DfplanError(f"cannot write --out {out}: {probe} is not a writable folder")
    return resume or interrupted_export


def publish(stage: Path, out: Path) -> None:
    """Move a finished export from `stage` into `out`, the manifest last: a folder with a
    manifest is complete whatever moment a kill strikes."""
    (out / "manifest.json").unlink(missing_ok=True)
    for f in sorted(stage.iterdir()):
        if f.name != "manifest.json":
            os.replace(f, out / f.name)
    os.replace(stage / "manifest.json", out / "manifest.json")
    stage.rmdir()


def load_plan(plan_arg: str, cfg):
    if plan_arg.startswith("layout:"):
        return layout_plan(plan_arg.removeprefix("layout:"), cfg)
    return Plan.from_json(plan_arg)


def resolve_tokenizer(teacher_tok, tokenizer_arg: str | None, teacher: str, cfg):
    from ..tokenizer import check_vocab, fingerprint, load_tokenizer
    tok = teacher_tok
    if tokenizer_arg is not None:
        given = load_tokenizer(tokenizer_arg)
        if teacher_tok is not None and fingerprint(given) != fingerprint(teacher_tok):
            raise DfplanError(f"tokenizer {tokenizer_arg} differs from the teacher's own tokenizer.json "
                              f"in {teacher}; the corpus must be encoded the way the teacher was trained "
                              "(drop --tokenizer)")
        tok = given
    if tok is None:
        raise DfplanError(f"teacher {teacher} has no tokenizer.json; pass --tokenizer with the one it was "
                          "trained with")
    check_vocab(tok, cfg)
    return tok


def _check_ids(tokens: np.ndarray, cfg, what: str) -> None:
    top = int(tokens.max()) if tokens.size else 0
    if top >= cfg.vocab_size:
        raise DfplanError(f"{what} contains token id {top} but the teacher's vocab_size is "
                          f"{cfg.vocab_size}: the text was encoded with another tokenizer")


@dataclass
class _Inputs:
    teacher: torch.nn.Module
    tok: object
    plan: object
    tokens: np.ndarray
    split: object
    eval_windows: np.ndarray
    eval_source: dict
    identity: dict
    resume: bool


def prepare(job: DistillJob, say: Callable[[str], None]) -> _Inputs:
    """Load and check everything; raises DfplanError without writing anything."""
    from ..data import evenly_spaced, gather, load_tokens, split_windows
    from ..loading import load_model, resolve_model_dir

    cfg_d = job.config
    cfg_d.schedule()                                      # token budget, fractions
    resume = check_out_dir(Path(job.out), job.resume)
    teacher, tok = load_model(job.teacher, dtype=torch.float32)
    cfg = teacher.config
    plan = load_plan(job.plan, cfg)
    plan.resolve(cfg)                                     # a plan for another model fails here
    tok = resolve_tokenizer(tok, job.tokenizer, job.teacher, cfg)
    stream = load_tokens(list(job.corpus), tok, glob=job.glob)
    _check_ids(stream.tokens, cfg, "the corpus")
    split = split_windows(len(stream), cfg_d.seq_len, cfg_d.valid_fraction, cfg_d.seed)
    say(f"corpus: {len(stream):,} tokens, {len(split.train)} train / {len(split.valid)} valid windows "
        f"of {cfg_d.seq_len}")
    L_eval = job.eval_seq_len or cfg_d.seq_len
    if job.eval_corpus:
        es = load_tokens(list(job.eval_corpus), tok, glob=job.glob)
        _check_ids(es.tokens, cfg, "the evaluation corpus")
        windows = stream_windows(es.tokens, L_eval, job.eval_windows)
        source = {"corpus": list(job.eval_corpus), "files": len(es.files), "split": "all"}
    else:
        if job.eval_seq_len and job.eval_seq_len != cfg_d.seq_len:
            raise DfplanError("--eval-seq-len needs --eval-corpus (the valid split has --seq-len windows)")
        windows = gather(stream.tokens, evenly_spaced(split.valid, job.eval_windows), cfg_d.seq_len + 1)
        source = {"corpus": list(job.corpus), "files": len(stream.files), "split": "valid"}
    tdir = resolve_model_dir(job.teacher)
    weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (tdir / f).exists()]
    ident = {"teacher": str(tdir.resolve()), "teacher_bytes": [(tdir / f).stat().st_size for f in weights],
             "corpus": stream.key, **job.extra_identity}
    return _Inputs(teacher, tok, plan, stream.tokens, split, windows, source, ident, resume)


# -- evaluation -------------------------------------------------------------------------------

def scaffold_only_plan(plan, cfg):
    """The same plan with every low-rank correction removed (exact unit names)."""
    resolved = plan.resolve(cfg)
    specs = {k: (Binary(v.scale, 0) if isinstance(v, Binary) else v) for k, v in resolved.items()}
    return Plan(specs=specs, default=plan.default, model=dict(plan.model), notes="scaffold only")


def _score(teacher, model, windows, bs, V) -> dict:
    from ..evaluate import kl_to_teacher, perplexity
    r = perplexity(model, windows, bs, vocab_size=V)
    return {"ppl": r.ppl, "nll": r.nll, "kl_to_teacher": kl_to_teacher(teacher, model, windows, bs, V)}


def evaluate_all(teacher, plan, packed_dir, windows, batch_size: int, seed: int) -> dict:
    """teacher / ptq / scaffold_only / student (the loaded artifact) on the same windows."""
    from ..evaluate import perplexity
    from ..formats.apply import apply_plan
    from ..packed import load_packed
    from .export import reference_kernels

    cfg = teacher.config
    V = cfg.vocab_size
    t = perplexity(teacher, windows, batch_size, vocab_size=V)
    res = {"teacher": {"ppl": t.ppl, "nll": t.nll, "kl_to_teacher": 0.0}}
    for name, p in (("ptq", plan), ("scaffold_only", scaffold_only_plan(plan, cfg))):
        m = apply_plan(copy.deepcopy(teacher), p, generator=torch.Generator().manual_seed(seed))
        res[name] = _score(teacher, m, windows, batch_size, V)
        del m
    student = load_packed(packed_dir)
    res["student"] = _score(teacher, student, windows, batch_size, V)
    with reference_kernels():
        res["student_ref_kernels"] = _score(teacher, student, windows, batch_size, V)
    res["windows"] = int(windows.shape[0])
    res["tokens"] = int(windows.shape[0] * (windows.shape[1] - 1))
    res["seq_len"] = int(windows.shape[1] - 1)
    return res


# -- the whole job ----------------------------------------------------------------------------

def run_distill(job: DistillJob, say: Callable[[str], None] = print, progress: bool | None = None,
                stop_after: int | None = None) -> dict | None:
    """Train, export, verify, evaluate. Returns eval.json's content on rank 0 (None elsewhere,
    or when stop_after interrupted the run)."""
    from ..formats.size import plan_bytes
    from ..provenance import git_commit
    from .export import export_student

    if job.threads:
        torch.set_num_threads(job.threads)
    rank, world = rank_world()
    device = torch.device(job.device) if job.device else None
    if device is not None and device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    inp = prepare(job, say if rank == 0 else (lambda _m: None))
    out = Path(job.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = train(inp.teacher, inp.plan, inp.tokens, inp.split, job.config, checkpoint=out / CHECKPOINT,
                resume=inp.resume, identity=inp.identity, stop_after=stop_after, progress=progress,
                say=say, device=device)
    if not res.finished or rank != 0:
        return None
    stage = out / STAGING       # from here a rerun finishes the export, with or without --resume
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    train_wall = time.perf_counter() - t0
    student = res.student.cpu()
    teacher = inp.teacher.cpu()
    check_batch = torch.from_numpy(inp.eval_windows[:min(4, len(inp.eval_windows)), :-1])
    st = res.state
    tok_s = st["tokens_seen"] / max(st["train_s"], 1e-9)
    cfg = teacher.config
    meta = {
        "teacher": job.teacher, "plan": job.plan, "plan_hash": inp.plan.hash(),
        "packed_bytes": plan_bytes(cfg, inp.plan).total_bytes,
        "fp16_bytes": 2 * sum(p.numel() for p in teacher.parameters()),
        "corpus": list(job.corpus), "corpus_tokens": int(len(inp.tokens)),
        "config": job.config.to_dict(), "schedule": res.schedule.to_dict(),
        "tokens_seen": st["tokens_seen"], "steps": st["step"], "train_s": round(st["train_s"], 2),
        "tokens_per_s": round(tok_s, 1), "wall_s_this_run": round(train_wall, 1), "processes": world,
        "threads": torch.get_num_threads(), "device": str(device or "cpu"),
        "final": st["history"][-1] if st["history"] else None,
        "torch": torch.__version__, "git_commit": git_commit(),
    }
    meta["compression"] = round(meta["fp16_bytes"] / meta["packed_bytes"], 3)
    say("exporting the packed student and checking it against the trained model")
    _, check = export_student(student, inp.plan, stage, check_batch, tokenizer=inp.tok,
                              extra={"distill": {k: meta[k] for k in ("teacher", "tokens_seen", "plan_hash")}})
    say(f"export check: max |dlogits| {check.max_abs_ref:.3g} on the reference path "
        f"(fast kernels: {check.max_abs_fast:.3g}); evaluating on {len(inp.eval_windows)} held-out windows")
    ev = evaluate_all(teacher, inp.plan, stage, inp.eval_windows, job.eval_batch_size, job.config.seed)
    ev["source"] = inp.eval_source
    ev["export_check"] = check.to_dict()
    ev["compression"] = meta["compression"]
    ev["packed_bytes"] = meta["packed_bytes"]
    write_log(stage, st["history"])
    write_json_atomic(stage / META, meta)
    write_json_atomic(stage / EVAL, ev)
    publish(stage, out)
    (out / CHECKPOINT).unlink(missing_ok=True)
    say(f"teacher ppl {ev['teacher']['ppl']:.2f} | plan untrained {ev['ptq']['ppl']:.2f} | scaffold only "
        f"{ev['scaffold_only']['ppl']:.2f} | student {ev['student']['ppl']:.2f} "
        f"(KL {ev['student']['kl_to_teacher']:.4f}); {tok_s:,.0f} tok/s; saved {out}")
    return ev
