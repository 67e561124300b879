"""Built-in teachers: train a small Mamba-2 LM on CPU so every stage has a real model
to compress without downloading one.

A run writes into one folder:
  tokenizer.json              byte-level BPE trained on the corpus (or the one given)
  checkpoint.pt               while training: model, optimizer, scheduler, data position, RNG
  train_log.jsonl             one line per validation: step, tokens, loss, val ppl, lr
  config.json, pytorch_model.bin   the final model, mamba_ssm format (dfplan.loading)
  zoo.json                    training metadata, written last: its presence means "done"
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import Mamba2Config
from .corpus import read_texts, resolve_corpus
from .data import EpochSampler, evenly_spaced, gather, load_tokens, split_windows, unigram_ppl
from .errors import DfplanError
from .evaluate import perplexity
from .fileio import atomic_path, write_json_atomic, write_text_atomic
from .loading import save_mamba_ssm
from .lr import lr_factor
from .model import build_model
from .provenance import git_commit
from .tokenizer import (
    TOKENIZER_FILE,
    check_vocab,
    fingerprint,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
    vocab_size_of,
)

CHECKPOINT = "checkpoint.pt"
META = "zoo.json"
LOG = "train_log.jsonl"
TEACHER_PRESETS = ("tiny", "small")

# Per-preset defaults sized for a 2-core CPU: tiny trains in about a minute for the demo,
# small in tens of minutes for experiments.
DEFAULTS = {
    "tiny": dict(steps=200, seq_len=128, batch_size=16, lr=3e-3),
    "small": dict(steps=600, seq_len=128, batch_size=16, lr=2e-3),
}


@dataclass(frozen=True)
class TrainConfig:
    out: str
    preset: str = "tiny"
    corpus: tuple = ("builtin",)
    glob: str = "*.txt"
    tokenizer: str | None = None        # None: train a BPE with the preset's vocab size
    steps: int | None = None            # None: the preset's default (DEFAULTS)
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None           # None: 10% of steps, at most 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    valid_fraction: float = 0.05
    eval_every: int | None = None       # None: about 5 validations per run
    eval_windows: int = 64              # periodic validations use this many valid windows
    final_eval_windows: int = 512
    ckpt_every: int | None = None       # None: same as eval_every
    seed: int = 0
    threads: int | None = None          # torch threads; None keeps torch's default
    resume: bool = False

    def resolved(self) -> "TrainConfig":
        """Fill preset defaults and validate; raises DfplanError before anything is written."""
        if self.preset not in TEACHER_PRESETS:
            raise DfplanError(f"unknown teacher preset {self.preset!r}; choose one of: "
                              f"{', '.join(TEACHER_PRESETS)}")
        d = {k: v for k, v in asdict(self).items()}
        for k, v in DEFAULTS[self.preset].items():
            if d[k] is None:
                d[k] = v
        for k in ("steps", "seq_len", "batch_size"):
            if int(d[k]) <= 0:
                raise DfplanError(f"--{k.replace('_', '-')} must be positive, got {d[k]}")
        if d["lr"] <= 0:
            raise DfplanError(f"--lr must be positive, got {d['lr']}")
        if d["warmup"] is None:
            d["warmup"] = min(100, max(1, d["steps"] // 10))
        if d["eval_every"] is None:
            d["eval_every"] = max(1, d["steps"] // 5)
        if d["ckpt_every"] is None:
            d["ckpt_every"] = d["eval_every"]
        d["corpus"] = tuple(str(c) for c in d["corpus"])
        d["out"] = str(d["out"])
        return TrainConfig(**d)


@dataclass
class _Prepared:
    cfg: Mamba2Config
    tok: object
    tokens: np.ndarray
    corpus_key: str
    files: tuple
    split: object


def _prepare(tc: TrainConfig, say: Callable[[str], None]) -> _Prepared:
    """Everything that can fail on bad input, done before the output folder is touched."""
    cfg = Mamba2Config.preset(tc.preset)
    cf = resolve_corpus(list(tc.corpus), tc.glob)
    out = Path(tc.out)
    notes = []          # reported only once the input is known to be usable
    if tc.resume and (out / TOKENIZER_FILE).is_file():
        tok = load_tokenizer(out / TOKENIZER_FILE)
    elif tc.tokenizer is not None:
        tok = load_tokenizer(tc.tokenizer)
    else:
        t0 = time.perf_counter()
        tok = train_bpe((text for _, text in read_texts(cf.files)), cfg.vocab_size)
        notes.append(f"trained a {vocab_size_of(tok)}-token BPE on {len(cf.files)} file(s) "
                     f"in {time.perf_counter() - t0:.1f}s")
    check_vocab(tok, cfg)
    stream = load_tokens(cf, tok)
    split = split_windows(len(stream), tc.seq_len, tc.valid_fraction, tc.seed)
    notes.append(f"corpus: {len(stream):,} tokens{' (cached)' if stream.cached else ''}, "
                 f"{len(split.train)} train / {len(split.valid)} valid windows of {tc.seq_len}")
    for n in notes:
        say(n)
    return _Prepared(cfg, tok, stream.tokens, stream.key, stream.files, split)


def _param_groups(model: torch.nn.Module, weight_decay: float):
    # decay matrices (and conv kernels); leave norms, biases and the SSM's A_log/D/dt_bias free
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def train_teacher(tc: TrainConfig, say: Callable[[str], None] = print, progress: bool | None = None,
                  on_step: Callable[[int], None] | None = None) -> dict:
    """Train (or resume, or find finished) a teacher; returns the zoo.json metadata.

    `progress` None shows the bar only on a terminal; `on_step(step)` runs after every
    finished step (a KeyboardInterrupt raised there checkpoints and stops cleanly).
    """
    tc = tc.resolved()
    out = Path(tc.out)
    if (out / META).is_file():
        if tc.resume:
            say(f"{out} already holds a finished teacher; nothing to do")
            return json.loads((out / META).read_text())
        raise DfplanError(f"{out} already holds a trained teacher; choose another --out")
    if (out / CHECKPOINT).is_file() and not tc.resume:
        raise DfplanError(f"{out} holds an unfinished run; pass --resume to continue it "
                          "or choose another --out")
    if out.exists() and not out.is_dir():
        raise DfplanError(f"--out {out} is a file; pass a folder")

    if tc.threads:
        torch.set_num_threads(tc.threads)
    prep = _prepare(tc, say)
    cfg, V, L = prep.cfg, prep.cfg.vocab_size, tc.seq_len
    train_starts, valid_starts = prep.split.train, prep.split.valid

    torch.manual_seed(tc.seed)
    model = build_model(cfg, seed=tc.seed)
    opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                            eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, tc.warmup, tc.steps, tc.min_lr_ratio))
    sampler = EpochSampler(len(train_starts), tc.batch_size, tc.seed)
    state = {"step": 0, "tokens_seen": 0, "train_s": 0.0, "loss_ema": None, "history": []}

    ckpt_path = out / CHECKPOINT
    if tc.resume and ckpt_path.is_file():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck["corpus_key"] != prep.corpus_key or ck["preset"] != tc.preset or ck["seq_len"] != L:
            raise DfplanError(f"{ckpt_path} was written for a different corpus, preset or seq-len; "
                              "resume with the original options or choose another --out")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        torch.set_rng_state(ck["torch_rng"])
        state = {k: ck[k] for k in state}
        say(f"resumed from step {state['step']} ({state['tokens_seen']:,} tokens seen)")

    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(prep.tok, out)      # rewritten every start so it always matches the model

    def checkpoint():
        with atomic_path(ckpt_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "corpus_key": prep.corpus_key, "preset": tc.preset, "seq_len": L,
                        **state}, tmp)

    def validate(n_windows: int) -> float:
        starts = evenly_spaced(valid_starts, n_windows)
        ppl = perplexity(model, gather(prep.tokens, starts, L + 1), tc.batch_size, vocab_size=V).ppl
        model.train()
        return ppl

    model.train()
    bar = tqdm(total=tc.steps, initial=state["step"], desc=f"zoo {tc.preset}", unit="step",
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    # What an interrupt leaves behind: a dict = the sampler position before an unfinished
    # step (model untouched, rewind the sampler); "updating" = parameters may be half
    # updated, so only the last periodic checkpoint is trustworthy; None = between steps.
    pending: dict | str | None = None
    try:
        while state["step"] < tc.steps:
            t0 = time.perf_counter()
            pending = sampler.state_dict()
            batch = torch.from_numpy(gather(prep.tokens, train_starts[sampler.next_indices()], L + 1))
            logits = model(batch[:, :-1])[..., :V]                    # (B, L, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            pending = "updating"
            opt.step()
            sched.step()
            state["train_s"] += time.perf_counter() - t0
            state["step"] += 1
            state["tokens_seen"] += batch[:, 1:].numel()
            ema = state["loss_ema"]
            state["loss_ema"] = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            pending = None
            tok_s = state["tokens_seen"] / max(state["train_s"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{state['loss_ema']:.3f}", tok_s=f"{tok_s:,.0f}")
            step = state["step"]
            if step % tc.eval_every == 0 and step < tc.steps:
                ppl = validate(tc.eval_windows)
                state["history"].append(_log_row(state, ppl, sched))
                tqdm.write(f"step {step}: loss {state['loss_ema']:.3f}, val ppl {ppl:.2f}, "
                           f"{tok_s:,.0f} tok/s", file=sys.stderr)
                _write_log(out, state["history"])
            if step % tc.ckpt_every == 0 and step < tc.steps:
                checkpoint()
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        bar.close()
        if pending == "updating":
            say("interrupted during a parameter update; --resume continues from the last checkpoint")
            raise
        if pending is not None:
            sampler.load_state_dict(pending)
        checkpoint()
        say(f"interrupted: checkpoint at step {state['step']} saved; rerun with --resume")
        raise
    bar.close()

    # final numbers on (up to) final_eval_windows validation windows
    starts = evenly_spaced(valid_starts, tc.final_eval_windows)
    val_ppl = validate(tc.final_eval_windows)
    valid_targets = gather(prep.tokens, starts, L + 1)[:, 1:]
    train_tokens = gather(prep.tokens, train_starts, L + 1)[:, 1:]
    uni = unigram_ppl(train_tokens.ravel(), valid_targets.ravel(), V)
    state["history"].append(_log_row(state, val_ppl, sched))
    _write_log(out, state["history"])

    save_mamba_ssm(model.eval(), out)
    meta = {
        "preset": tc.preset, "config": cfg.to_mamba_ssm_dict(), "parameters": model.num_parameters(),
        "corpus": list(tc.corpus), "corpus_files": len(prep.files), "corpus_tokens": int(len(prep.tokens)),
        "corpus_key": prep.corpus_key, "tokenizer_sha256": fingerprint(prep.tok),
        "steps": state["step"], "seq_len": L, "batch_size": tc.batch_size,
        "tokens_seen": state["tokens_seen"], "val_ppl": round(val_ppl, 3), "unigram_ppl": round(uni, 3),
        "val_windows": int(len(starts)), "val_tokens": int(valid_targets.size),
        "tokens_per_s": round(state["tokens_seen"] / max(state["train_s"], 1e-9), 1),
        "train_wall_s": round(state["train_s"], 1), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "git_commit": git_commit(), "train_config": asdict(tc),
    }
    meta = json.loads(json.dumps(meta))     # exactly what a later read of zoo.json returns
    write_json_atomic(out / META, meta)
    ckpt_path.unlink(missing_ok=True)
    say(f"val ppl {val_ppl:.2f} (unigram baseline {uni:.2f}) after {state['tokens_seen']:,} tokens; "
        f"saved {out}")
    return meta


def _log_row(state: dict, val_ppl: float, sched) -> dict:
    ema = state["loss_ema"]
    return {"step": state["step"], "tokens": state["tokens_seen"],
            "loss": None if ema is None else round(ema, 4), "val_ppl": round(val_ppl, 3),
            "lr": sched.get_last_lr()[0]}


def _write_log(out: Path, history: list) -> None:
    write_text_atomic(out / LOG, "".join(json.dumps(h) + "\n" for h in history))


# ------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class TeacherInfo:
    path: str
    preset: str
    steps: int
    tokens_seen: int
    val_ppl: float
    unigram_ppl: float


def preset_rows() -> list[dict]:
    rows = []
    for name in TEACHER_PRESETS:
        cfg = Mamba2Config.preset(name)
        n = build_model(cfg, device="meta").num_parameters()
        rows.append({"preset": name, "d_model": cfg.d_model, "n_layer": cfg.n_layer,
                     "vocab": cfg.vocab_size, "params": n, **DEFAULTS[name]})
    return rows


def find_teachers(root: str | os.PathLike) -> list[TeacherInfo]:
    """Finished teachers (folders with zoo.json) under root, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for meta in sorted(root.rglob(META)):
        try:
            m = json.loads(meta.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found.append(TeacherInfo(str(meta.parent), m.get("preset", "?"), m.get("steps", 0),
                                 m.get("tokens_seen", 0), m.get("val_ppl", float("nan")),
                                 m.get("unigram_ppl", float("nan"))))
    return found
