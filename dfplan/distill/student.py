"""Build the trainable student from the FP teacher and a plan, and choose what trains.

The student is a copy of the teacher in which every Binary / IntN unit of the plan becomes a
QAT module (dfplan.distill.qat) holding the teacher's weight as its latent. Everything the
packed checkpoint stores as plain floats (Keep units and the fixed tensors: norms, conv1d,
A_log, D, dt_bias, biases) is rounded to its stored dtype up front, so the student computes
with the values the artifact will hold.

What trains (DF-SSM trains only the compressed weights and their corrections):
  stage 1: the latents of the compressed units;
  stage 2: Binary scales + low-rank U, V; IntN latents (fake-quantized);
  with train_norms=True also the RMSNorm weights (block norms, gated mixer norms, norm_f),
  until the final phase, where they are rounded to the stored dtype and frozen.
Keep units, the embedding when kept, conv1d, A_log, D and dt_bias stay frozen.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..errors import DfplanError
from ..formats.apply import round_to_storage_
from ..formats.specs import Binary, IntN, Keep
from ..formats.units import compressible_units, fixed_tensors
from .qat import QATBinaryLinear, QATIntNEmbedding, QATIntNLinear, QATLinear, qat_modules, set_phase


def _storage(keep: Keep) -> torch.dtype:
    return getattr(torch, keep.torch_dtype_name)


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def norm_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """RMSNorm / gated RMSNorm weights (names ending in norm.weight, norm2.weight, norm_f.weight)."""
    return [(n, p) for n, p in model.named_parameters()
            if n.endswith(("norm.weight", "norm2.weight", "norm_f.weight"))]


@torch.no_grad()
def build_student(teacher: nn.Module, plan) -> nn.Module:
    """A QAT student for `plan` (a planner Plan), all parameters frozen; see trainable_parameters."""
    cfg = teacher.config
    resolved = plan.resolve(cfg)                   # DfplanError for a plan of another model
    student = copy.deepcopy(teacher).float()
    for p in student.parameters():
        p.requires_grad_(False)
    default = _storage(plan.default)
    for u in compressible_units(cfg):
        spec = resolved[u.name]
        mod = student.get_submodule(u.name)
        w = mod.weight
        if tuple(w.shape) != u.shape:
            raise DfplanError(f"{u.name}: the teacher's weight is {tuple(w.shape)}, its config says {u.shape}")
        bias = getattr(mod, "bias", None)
        if bias is not None:
            bias = bias.detach().clone()
            round_to_storage_(bias, default)
        if isinstance(spec, Keep):
            round_to_storage_(w, _storage(spec))
            continue
        if isinstance(spec, Binary):
            if u.kind in ("embedding", "lm_head"):
                raise DfplanError(f"{u.name} cannot take {spec}; use a Keep or row-wise IntN format")
            new = QATBinaryLinear(w, spec, bias)
        elif isinstance(spec, IntN):
            new = QATIntNEmbedding(w, spec) if u.kind == "embedding" else QATIntNLinear(w, spec, bias)
        else:
            raise DfplanError(f"{u.name}: unknown format {spec!r}")
        new.latent.requires_grad_(False)
        _swap(student, u.name, new)
    sd = student.state_dict(keep_vars=True)
    for name, _ in fixed_tensors(cfg):
        t = sd.get(name)
        if t is not None:
            round_to_storage_(t.data if isinstance(t, nn.Parameter) else t, default)
    set_phase(student, "anneal", 0.0)
    student.dfplan_plan = plan
    return student


def begin_stage2(student: nn.Module, seed: int, teacher: nn.Module | None = None) -> None:
    """Freeze every scaffold and start its correction (deterministic for a given seed).

    The correction approximates latent - scaffold, or teacher weight - scaffold when a
    teacher is given (what the annealed scaffold lost of the original layer).
    """
    g = torch.Generator().manual_seed(int(seed))
    for name, m in qat_modules(student):
        target = None if teacher is None else teacher.get_submodule(name).weight
        m.begin_correction(generator=g, target=target)


def allocate_stage2(student: nn.Module) -> None:
    """Stage-2 shapes without computing anything (a checkpoint's values are loaded next)."""
    for _, m in qat_modules(student):
        if isinstance(m, QATBinaryLinear):
            m.allocate_stage2()


def trainable_parameters(student: nn.Module, stage: int, train_norms: bool, final: bool = False
                         ) -> list[tuple[str, nn.Parameter, str]]:
    """(name, parameter, group) of what trains now; group in latent | scale | factor | norm.

    Sets requires_grad on exactly these, and off everywhere else.
    """
    for p in student.parameters():
        p.requires_grad_(False)
    out: list[tuple[str, nn.Parameter, str]] = []
    for name, m in qat_modules(student):
        if isinstance(m, QATBinaryLinear) and m.stage2:
            if stage == 1:
                raise RuntimeError(f"{name} is already in stage 2")
            for attr in ("row_scale", "col_scale", "col_shift"):
                p = getattr(m, attr)
                if p is not None:
                    out.append((f"{name}.{attr}", p, "scale"))
            for attr in ("u", "v"):
                p = getattr(m, attr)
                if p is not None:
                    out.append((f"{name}.{attr}", p, "factor"))
        elif isinstance(m, QATLinear):
            out.append((f"{name}.latent", m.latent, "latent"))
    if train_norms and not final:
        out += [(n, p, "norm") for n, p in norm_parameters(student)]
    for _, p, _ in out:
        p.requires_grad_(True)
    return out


@torch.no_grad()
def freeze_norms_for_export(student: nn.Module, plan) -> None:
    """Round trained norm weights to the stored dtype (idempotent): the final phase trains none."""
    dtype = _storage(plan.default)
    for _, p in norm_parameters(student):
        round_to_storage_(p.data, dtype)
        p.requires_grad_(False)
