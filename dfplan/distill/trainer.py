"""The DF-SSM training loop: teacher logits on the fly, two stages, resumable, data-parallel.

One step: the global batch of `batch_size` windows is drawn by EpochSampler (identical on
every rank), each rank takes its contiguous shard, runs the FP teacher (no grad) and the QAT
student on it, and the gradients are averaged over ranks with one all-reduce, so N processes
compute the step one process would on the whole batch.

Checkpoints (`checkpoint.pt`, atomic) hold the student, the optimizer, the data position, the
step (everything the schedule needs) and the RNG; resuming continues bit for bit. A
non-finite loss or gradient stops the run before the optimizer moves, leaving the last good
checkpoint untouched.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..data import EpochSampler, WindowSplit, gather
from ..distributed import rank_world
from ..errors import DfplanError
from ..fileio import atomic_path, write_text_atomic
from .losses import LossConfig, distill_loss
from .qat import set_phase
from .schedule import Schedule
from .student import allocate_stage2, begin_stage2, build_student, freeze_norms_for_export, trainable_parameters

CKPT_FORMAT = "dfplan-distill-checkpoint"
CKPT_VERSION = 1


@dataclass(frozen=True)
class DistillConfig:
    tokens: int                          # total training tokens (both stages)
    seq_len: int = 512
    batch_size: int = 8                  # global windows per step (split over ranks)
    stage1_fraction: float = 0.38        # DF-SSM: 12.3M of 32.3M tokens
    anneal_fraction: float = 0.8         # a reaches 1 after this fraction of stage 1
    final_fraction: float = 0.25         # last fraction of stage 2 with integer corrections
    # AdamW learning rates per parameter group; tuned on the built-in tiny teacher (larger
    # models, with smaller weights, may want them lower)
    lr_latent: float = 3e-4              # latent weights (stage 1; IntN units in stage 2)
    lr_correction: float = 3e-3          # low-rank U, V
    lr_scale: float = 3e-4               # Binary row / FBI scales
    lr_norm: float = 3e-4                # RMSNorm weights when train_norms
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)
    train_norms: bool = False
    correction_from: str = "latent"      # residual the stage-2 correction starts from: latent | teacher
    valid_fraction: float = 0.05
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.loss, dict):
            object.__setattr__(self, "loss", LossConfig(**self.loss))
        if self.tokens <= 0:
            raise DfplanError(f"token budget must be positive, got {self.tokens}; pass --tokens N (e.g. 2M)")
        for k in ("seq_len", "batch_size", "checkpoint_every"):
            if getattr(self, k) <= 0:
                raise DfplanError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")
        if self.correction_from not in ("latent", "teacher"):
            raise DfplanError(f"correction_from must be 'latent' or 'teacher', got {self.correction_from!r}")
        for k in ("lr_latent", "lr_correction", "lr_scale", "lr_norm"):
            if not getattr(self, k) > 0:
                raise DfplanError(f"--{k.replace('_', '-')} must be positive, got {getattr(self, k)}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def schedule(self) -> Schedule:
        return Schedule.make(self.tokens, self.tokens_per_step, self.stage1_fraction,
                             self.anneal_fraction, self.final_fraction, self.warmup, self.min_lr_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss"] = asdict(self.loss)
        return d

    def identity(self) -> dict:
        """What must not change between a run and its resumption."""
        d = self.to_dict()
        d.pop("checkpoint_every")
        return d


@dataclass
class TrainResult:
    student: torch.nn.Module
    schedule: Schedule
    state: dict                          # step, tokens_seen, train_s, history
    finished: bool


def _barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def _allreduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors over ranks in place (one flat all-reduce)."""
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i:i + n].view_as(t))
        i += n


_GROUP_LR = {"latent": "lr_latent", "factor": "lr_correction", "scale": "lr_scale", "norm": "lr_norm"}


def make_optimizer(student, stage: int, cfg: DistillConfig) -> tuple[torch.optim.Optimizer, list]:
    named = trainable_parameters(student, stage, cfg.train_norms)
    if not named:
        raise DfplanError("the plan compresses nothing, so there is nothing to distill; "
                          "give some layers a bin/fbi/int format")
    groups = []
    for g in ("latent", "factor", "scale", "norm"):
        ps = [p for _, p, grp in named if grp == g]
        if ps:
            lr = getattr(cfg, _GROUP_LR[g])
            groups.append({"params": ps, "lr": lr, "base_lr": lr, "name": g})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    return opt, [p for _, p, _ in named]


class _Checkpointer:
    def __init__(self, path: Path | None, identity: dict):
        self.path, self.identity = path, identity
        self.last_step: int | None = None

    def save(self, student, opt, sampler, stage: int, state: dict) -> None:
        if self.path is None:
            return
        if rank_world()[0] == 0:
            with atomic_path(self.path) as tmp:
                torch.save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "identity": self.identity,
                            "stage": stage, "model": student.state_dict(), "optimizer": opt.state_dict(),
                            "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
                            **state}, tmp)
        _barrier()
        self.last_step = state["step"]

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            ck = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DfplanError(f"cannot read checkpoint {self.path} ({type(e).__name__}); delete it "
                              "to start over") from None
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise DfplanError(f"{self.path} is not a dfplan distillation checkpoint")
        if ck["identity"] != self.identity:
            a, b = _flat(ck["identity"]), _flat(self.identity)
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise DfplanError(f"{self.path} was written by a run with different {', '.join(diff)}; "
                              "resume with the original options or choose another --out")
        self.last_step = int(ck["step"])
        return ck


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diverged(step: int, what: str, value: float, ckpt: _Checkpointer) -> DfplanError:
    if ckpt.last_step is not None:
        kept = f"the last good checkpoint {ckpt.path} (step {ckpt.last_step}) is kept"
    else:
        kept = "no checkpoint had been written yet"
    return DfplanError(f"distillation diverged at step {step}: {what} is {value}; stopped before "
                       f"updating the weights, {kept}; resume with lower learning rates (--lr-*)")


def _restore(ck: dict, student, sampler, cfg: DistillConfig, device) -> tuple:
    """Load a checkpoint into the student, a fresh optimizer and the sampler -> (opt, params, stage)."""
    if ck["stage"] == 2:
        allocate_stage2(student)
    student.load_state_dict(ck["model"])
    student.to(device)
    opt, params = make_optimizer(student, ck["stage"], cfg)
    opt.load_state_dict(ck["optimizer"])
    sampler.load_state_dict(ck["sampler"])
    torch.set_rng_state(ck["torch_rng"])
    return opt, params, ck["stage"]


def _enter_stage(stage: int, student, teacher, cfg: DistillConfig, device) -> tuple:
    """Stage 2 allocates the low-rank corrections; every stage gets its own optimizer."""
    if stage == 2:
        begin_stage2(student, cfg.seed, teacher if cfg.correction_from == "teacher" else None)
        student.to(device)
    return make_optimizer(student, stage, cfg)


def _set_phase_and_lr(student, plan, opt, sched: Schedule, step: int, cfg: DistillConfig) -> float:
    """QAT phase and sign-annealing of this step, norms frozen for export in the final phase,
    learning rates scaled by the schedule; -> the lr factor."""
    phase = sched.phase(step)
    set_phase(student, phase, sched.anneal(step))
    if phase == "final" and cfg.train_norms:
        freeze_norms_for_export(student, plan)
    lr_f = sched.lr_factor(step)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_f
    return lr_f


def _optimise(student, teacher, batch: torch.Tensor, opt, params: list, cfg: DistillConfig, V: int,
              step: int, ckpt: _Checkpointer) -> tuple[float, float, float, float]:
    """One distillation step on `batch` (b, L + 1), gradients averaged over ranks; refuses to
    update on a non-finite loss or gradient -> (loss, kl, ce, grad norm)."""
    x, y = batch[:, :-1], batch[:, 1:]
    with torch.no_grad():
        t_logits = teacher(x)                                   # (b, L, Vp)
    loss, parts = distill_loss(student(x), t_logits, y, cfg.loss, vocab_size=V)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in params if p.grad is not None]
    shown = torch.stack([loss.detach(), parts["kl"], parts["ce"]]).float()
    _allreduce_mean_(grads + [shown])
    loss_v, kl_v, ce_v = (float(v) for v in shown)
    if not math.isfinite(loss_v):
        raise _diverged(step, "the loss", loss_v, ckpt)
    gnorm = float(torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], cfg.grad_clip))
    if not math.isfinite(gnorm):
        raise _diverged(step, "the gradient norm", gnorm, ckpt)
    opt.step()
    return loss_v, kl_v, ce_v, gnorm


def train(teacher: torch.nn.Module, plan, tokens: np.ndarray, split: WindowSplit, cfg: DistillConfig, *,
          checkpoint: str | Path | None = None, resume: bool = False, identity: dict | None = None,
          stop_after: int | None = None, on_step: Callable | None = None,
          progress: bool | None = None, say: Callable[[str], None] = print,
          device: torch.device | str | None = None) -> TrainResult:
    """Distill `teacher` into a QAT student for `plan` on the train windows of `split`.

    checkpoint: path of checkpoint.pt (None: no checkpoints); resume: continue from it.
    identity: extra facts (teacher, plan hash, corpus) a resumed run must share.
    stop_after: return (unfinished) after this many steps of this call, as if killed,
    without writing a checkpoint. on_step(step, student) runs after every step.
    """
    rank, world = rank_world()
    if cfg.batch_size % world:
        raise DfplanError(f"--batch-size {cfg.batch_size} must be a multiple of the number of "
                          f"processes ({world})")
    sched = cfg.schedule()
    L, V = cfg.seq_len, teacher.config.vocab_size
    local = cfg.batch_size // world
    train_starts = split.train
    ident = {"config": cfg.identity(), "plan": plan.hash(), "schedule": sched.to_dict(), **(identity or {})}
    ckpt = _Checkpointer(Path(checkpoint) if checkpoint is not None else None, ident)

    teacher = teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_student(teacher, plan).to(device)
    sampler = EpochSampler(len(train_starts), cfg.batch_size, cfg.seed)
    state = {"step": 0, "tokens_seen": 0, "train_s": 0.0, "history": []}
    opt, params, opt_stage = None, [], 0

    ck = ckpt.load() if resume else None
    if ck is not None:
        opt, params, opt_stage = _restore(ck, student, sampler, cfg, device)
        state = {k: ck[k] for k in state}
        say(f"resumed from step {state['step']} of {sched.total} ({state['tokens_seen']:,} tokens seen)")
    del ck

    student.train()
    bar = tqdm(total=sched.total, initial=state["step"], desc="distill", unit="step", dynamic_ncols=True,
               disable=(rank != 0) or ((not progress) if progress is not None else None))
    log_every = max(1, sched.total // 100)
    ema, steps_here = None, 0
    try:
        while state["step"] < sched.total:
            step = state["step"]
            stage, phase = sched.stage(step), sched.phase(step)
            if stage != opt_stage:
                opt, params = _enter_stage(stage, student, teacher, cfg, device)
                opt_stage = stage
            lr_f = _set_phase_and_lr(student, plan, opt, sched, step, cfg)

            t0 = time.perf_counter()
            idx = sampler.next_indices()[rank * local:(rank + 1) * local]
            batch = torch.from_numpy(gather(tokens, train_starts[idx], L + 1)).to(device)   # (b, L + 1)
            loss_v, kl_v, ce_v, gnorm = _optimise(student, teacher, batch, opt, params, cfg, V, step, ckpt)
            state["train_s"] += time.perf_counter() - t0
            state["step"] += 1
            state["tokens_seen"] += cfg.tokens_per_step
            steps_here += 1
            ema = loss_v if ema is None else 0.95 * ema + 0.05 * loss_v
            tok_s = state["tokens_seen"] / max(state["train_s"], 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.3f}", kl=f"{kl_v:.3f}", phase=phase,
                            a=f"{sched.anneal(step):.2f}", tok_s=f"{tok_s:,.0f}")
            if state["step"] % log_every == 0 or state["step"] == sched.total:
                state["history"].append({"step": state["step"], "tokens": state["tokens_seen"],
                                         "loss": round(loss_v, 5), "kl": round(kl_v, 5), "ce": round(ce_v, 5),
                                         "phase": phase, "anneal": round(sched.anneal(step), 4),
                                         "lr_factor": round(lr_f, 5), "grad_norm": round(gnorm, 4)})
            if state["step"] % cfg.checkpoint_every == 0 and state["step"] < sched.total:
                ckpt.save(student, opt, sampler, stage, state)
                if ckpt.path is not None and rank == 0:
                    write_log(ckpt.path.parent, state["history"])
            if on_step is not None:
                on_step(state["step"], student)
            if stop_after is not None and steps_here >= stop_after and state["step"] < sched.total:
                bar.close()
                return TrainResult(student, sched, state, finished=False)
    except KeyboardInterrupt:
        if opt is not None and state["step"] > 0:
            ckpt.save(student, opt, sampler, sched.stage(state["step"] - 1), state)
            say(f"interrupted: checkpoint at step {state['step']} saved in {ckpt.path}; the same "
                "command with --resume continues it")
        bar.close()
        raise
    bar.close()
    if steps_here and opt is not None:
        # the finished state on disk: a run killed during export resumes here, not mid-training
        ckpt.save(student, opt, sampler, sched.stage(sched.total - 1), state)
    set_phase(student, sched.phase(sched.total - 1), 1.0)
    student.eval()
    if rank == 0 and state["history"]:
        h = state["history"][-1]
        tqdm.write(f"distilled {state['tokens_seen']:,} tokens in {state['train_s']:.0f}s "
                   f"({state['tokens_seen'] / max(state['train_s'], 1e-9):,.0f} tok/s): "
                   f"loss {h['loss']:.4f}, KL(T) {h['kl']:.4f}, CE {h['ce']:.4f}", file=sys.stderr)
    return TrainResult(student, sched, state, finished=True)


def write_log(folder: Path, history: list) -> None:
    write_text_atomic(Path(folder) / "train_log.jsonl", "".join(json.dumps(h) + "\n" for h in history))
