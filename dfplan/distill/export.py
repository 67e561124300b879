"""Export the trained QAT student as a packed checkpoint, and prove it is the trained model.

Nothing is re-quantized on the way out: every compressed unit hands over `payload()`, the
very integer tensors and fp16 scales its final-phase forward computed with, the float
tensors were rounded to their stored dtype during training, and the inference model is
assign-loaded from exactly these tensors. The check then reloads the directory with
load_packed and compares its logits with the student's on a held-out batch: on the
reference kernel path (DFPLAN_KERNELS=ref: dequantize + F.linear) they must agree to float
rounding; the fast kernel path (int8 activations on CPU) is measured and reported apart.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..formats.apply import prepare_empty
from ..model import build_model
from ..packed import load_packed, save_packed
from .qat import qat_modules

REF_ENV = "DFPLAN_KERNELS"
EXACT_RTOL = 1e-5


@contextlib.contextmanager
def reference_kernels():
    """Force the reference (dequantize + F.linear) path of the compressed modules."""
    old = os.environ.get(REF_ENV)
    os.environ[REF_ENV] = "ref"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(REF_ENV, None)
        else:
            os.environ[REF_ENV] = old


@torch.no_grad()
def packed_state(student: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of the inference model: QAT units' stored payloads + every other tensor as is."""
    qat = dict(qat_modules(student))
    sd = {}
    for k, v in student.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner not in qat:
            sd[k] = v.detach()
    for name, m in qat.items():
        for t, val in m.payload().items():
            sd[f"{name}.{t}"] = val.detach().cpu()
        if m.bias is not None:
            sd[f"{name}.bias"] = m.bias.detach()
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def to_inference(student: nn.Module, plan) -> nn.Module:
    """The packed-format model holding exactly the student's final-phase tensors."""
    cfg = student.config
    model = build_model(cfg, device="meta")
    prepare_empty(model, plan, compute_dtype=torch.float32)
    model.load_state_dict(packed_state(student), strict=True, assign=True)
    model.dfplan_plan = plan
    return model.eval()


@dataclass(frozen=True)
class ExportCheck:
    max_abs_ref: float          # max |packed (reference path) - student| over the batch logits
    rel_ref: float              # the same relative to max |student logits|
    max_abs_fast: float         # default kernel path of the loaded artifact vs student
    rel_fast: float
    exact: bool                 # rel_ref <= tolerance
    tolerance: float
    batch_shape: tuple

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_shape"] = list(self.batch_shape)
        return d


def _diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    d = (a.float() - b.float()).abs().max().item()
    return d, d / max(b.float().abs().max().item(), 1e-30)


@torch.no_grad()
def check_export(student: nn.Module, packed_dir: str | os.PathLike, batch: torch.Tensor,
                 tolerance: float = EXACT_RTOL) -> ExportCheck:
    """Reload packed_dir and compare its logits with the student's on batch (B, L) ids."""
    student.eval()
    device = next(student.parameters()).device
    x = batch.to(device)
    want = student(x).cpu()
    with reference_kernels():
        loaded = load_packed(packed_dir)
        ref = loaded(batch).cpu()
    fast = loaded(batch).cpu()
    a_ref, r_ref = _diff(ref, want)
    a_fast, r_fast = _diff(fast, want)
    return ExportCheck(a_ref, r_ref, a_fast, r_fast, r_ref <= tolerance, tolerance, tuple(batch.shape))


def export_student(student: nn.Module, plan, out_dir: str | os.PathLike, batch: torch.Tensor, *,
                   tokenizer=None, extra: dict | None = None,
                   tolerance: float = EXACT_RTOL) -> tuple[Path, ExportCheck]:
    """save_packed the student into out_dir, reload, check; a failed check leaves no manifest."""
    if not qat_modules(student):
        raise RuntimeError("export_student expects a QAT student (dfplan.distill.student.build_student)")
    model = to_inference(student, plan)
    out = save_packed(model, plan, out_dir, tokenizer=tokenizer, extra=extra)
    del model
    check = check_export(student, out, batch, tolerance)
    if not check.exact:
        (Path(out) / "manifest.json").unlink(missing_ok=True)   # an unverified export must not load
        raise RuntimeError(f"exported artifact differs from the trained model: max |dlogits| "
                           f"{check.max_abs_ref:.3g} (relative {check.rel_ref:.3g} > {tolerance:g}); "
                           "this is a bug in the export, please report it")
    return out, check
