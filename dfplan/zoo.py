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


@dataclass
class _TeacherRun:
    """Everything one training run holds, with its step, validation, log and checkpoint helpers."""
    tc: TrainConfig
    prep: "_Prepared"
    out: Path
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    sampler: EpochSampler
    state: dict                 # step, tokens_seen, train_s, loss_ema, history

    @classmethod
    def start(cls, tc: TrainConfig, prep: "_Prepared", out: Path) -> "_TeacherRun":
        torch.manual_seed(tc.seed)
        model = build_model(prep.cfg, seed=tc.seed)
        opt = torch.optim.AdamW(_param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                                eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, tc.warmup, tc.steps, tc.min_lr_ratio))
        sampler = EpochSampler(len(prep.split.train), tc.batch_size, tc.seed)
        state = {"step": 0, "tokens_seen": 0, "train_s": 0.0, "loss_ema": None, "history": []}
        return cls(tc, prep, out, model, opt, sched, sampler, state)

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT

    def checkpoint(self) -> None:
        with atomic_path(self.ckpt_path) as tmp:
            torch.save({"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                        "scheduler": self.sched.state_dict(), "sampler": self.sampler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "corpus_key": self.prep.corpus_key, "preset": self.tc.preset,
                        "seq_len": self.tc.seq_len, **self.state}, tmp)

    def restore(self) -> None:
        ck = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        if (ck["corpus_key"] != self.prep.corpus_key or ck["preset"] != self.tc.preset
                or ck["seq_len"] != self.tc.seq_len):
            raise DfplanError(f"{self.ckpt_path} was written for a different corpus, preset or seq-len; "
                              "resume with the original options or choose another --out")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.sampler.load_state_dict(ck["sampler"])
        torch.set_rng_state(ck["torch_rng"])
        self.state = {k: ck[k] for k in self.state}

    def train_step(self, before_update: Callable[[], None]) -> None:
        """One optimiser step on the sampler's next batch; `before_update` runs just before the
        parameters change (from then on an interrupt cannot rewind the step)."""
        L, V, st = self.tc.seq_len, self.prep.cfg.vocab_size, self.state
        t0 = time.perf_counter()
        batch = torch.from_numpy(gather(self.prep.tokens, self.prep.split.train[self.sampler.next_indices()],
                                        L + 1))
        logits = self.model(batch[:, :-1])[..., :V]                    # (B, L, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        before_update()
        self.opt.step()
        self.sched.step()
        st["train_s"] += time.perf_counter() - t0
        st["step"] += 1
        st["tokens_seen"] += batch[:, 1:].numel()
        ema = st["loss_ema"]
        st["loss_ema"] = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()

    def validate(self, n_windows: int) -> float:
        starts = evenly_spaced(self.prep.split.valid, n_windows)
        ppl = perplexity(self.model, gather(self.prep.tokens, starts, self.tc.seq_len + 1), self.tc.batch_size,
                         vocab_size=self.prep.cfg.vocab_size).ppl
        self.model.train()
        return ppl

    def after_step(self, tok_s: float) -> None:
        """Periodic validation + log row and checkpoint (not at the last step: finish() does both)."""
        step, tc = self.state["step"], self.tc
        if step % tc.eval_every == 0 and step < tc.steps:
            ppl = self.validate(tc.eval_windows)
            self.state["history"].append(_log_row(self.state, ppl, self.sched))
            tqdm.write(f"step {step}: loss {self.state['loss_ema']:.3f}, val ppl {ppl:.2f}, "
                       f"{tok_s:,.0f} tok/s", file=sys.stderr)
            _write_log(self.out, self.state["history"])
        if step % tc.ckpt_every == 0 and step < tc.steps:
            self.checkpoint()

    def finish(self, say: Callable[[str], None]) -> dict:
        """Final numbers on (up to) final_eval_windows validation windows; save; -> zoo.json."""
        tc, prep, st, L, V = self.tc, self.prep, self.state, self.tc.seq_len, self.prep.cfg.vocab_size
        starts = evenly_spaced(prep.split.valid, tc.final_eval_windows)
        val_ppl = self.validate(tc.final_eval_windows)
        valid_targets = gather(prep.tokens, starts, L + 1)[:, 1:]
        train_tokens = gather(prep.tokens, prep.split.train, L + 1)[:, 1:]
        uni = unigram_ppl(train_tokens.ravel(), valid_targets.ravel(), V)
        st["history"].append(_log_row(st, val_ppl, self.sched))
        _write_log(self.out, st["history"])

        save_mamba_ssm(self.model.eval(), self.out)
        meta = {
            "preset": tc.preset, "config": prep.cfg.to_dict(), "parameters": self.model.num_parameters(),
            "corpus": list(tc.corpus), "corpus_files": len(prep.files), "corpus_tokens": int(len(prep.tokens)),
            "corpus_key": prep.corpus_key, "tokenizer_sha256": fingerprint(prep.tok),
            "steps": st["step"], "seq_len": L, "batch_size": tc.batch_size,
            "tokens_seen": st["tokens_seen"], "val_ppl": round(val_ppl, 3), "unigram_ppl": round(uni, 3),
            "val_windows": int(len(starts)), "val_tokens": int(valid_targets.size),
            "tokens_per_s": round(st["tokens_seen"] / max(st["train_s"], 1e-9), 1),
            "train_wall_s": round(st["train_s"], 1), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "git_commit": git_commit(), "train_config": asdict(tc),
        }
        meta = json.loads(json.dumps(meta))     # exactly what a later read of zoo.json returns
        write_json_atomic(self.out / META, meta)
        self.ckpt_path.unlink(missing_ok=True)
        say(f"val ppl {val_ppl:.2f} (unigram baseline {uni:.2f}) after {st['tokens_seen']:,} tokens; "
            f"saved {self.out}")
        return meta


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
    run = _TeacherRun.start(tc, _prepare(tc, say), out)
    if tc.resume and run.ckpt_path.is_file():
        run.restore()
        say(f"resumed from step {run.state['step']} ({run.state['tokens_seen']:,} tokens seen)")
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(run.prep.tok, out)      # rewritten every start so it always matches the model

    run.model.train()
    bar = tqdm(total=tc.steps, initial=run.state["step"], desc=f"zoo {tc.preset}", unit="step",
               disable=(not progress) if progress is not None else None, dynamic_ncols=True)
    # What an interrupt leaves behind: a dict = the sampler position before an unfinished
    # step (model untouched, rewind the sampler); "updating" = parameters may be half
    # updated, so only the last periodic checkpoint is trustworthy; None = between steps.
    pending: dict | str | None = None

    def updating() -> None:
        nonlocal pending
        pending = "updating"

    try:
        while run.state["step"] < tc.steps:
            pending = run.sampler.state_dict()
            run.train_step(updating)
            pending = None
            tok_s = run.state["tokens_seen"] / max(run.state["train_s"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{run.state['loss_ema']:.3f}", tok_s=f"{tok_s:,.0f}")
            run.after_step(tok_s)
            if on_step is not None:
                on_step(run.state["step"])
    except KeyboardInterrupt:
        bar.close()
        if pending == "updating":
            say("interrupted during a parameter update; --resume continues from the last checkpoint")
            raise
        if pending is not None:
            run.sampler.load_state_dict(pending)
        run.checkpoint()
        say(f"interrupted: checkpoint at step {run.state['step']} saved; rerun with --resume")
        raise
    bar.close()
    return run.finish(say)


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
