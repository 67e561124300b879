"""Apply a plan to a model: swap compressed modules in by FQN, round kept tensors to their dtype.

After apply_plan the in-memory model computes exactly what its packed checkpoint will:
- IntN / Binary units become IntNLinear / IntNEmbedding / BinaryLinear (quantised once here);
- Keep units and every fixed tensor (norms, conv1d, A_log, D, dt_bias, biases) stay float
  modules in the model's dtype but their VALUES are rounded to the stored dtype (fp16 by
  default), so saving is lossless and save -> load is bit-identical.
`prepare_empty(model, plan)` does the swap on a meta-device model without quantising
anything; load_packed uses it before assign-loading the stored tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DfplanError
from .modules import CompressedModule, module_for
from .units import compressible_units, fixed_tensors


def _parent(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent, _, child = fqn.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


def _get(model: nn.Module, fqn: str) -> nn.Module:
    try:
        return model.get_submodule(fqn)
    except AttributeError:
        raise DfplanError(f"the model has no module {fqn!r}; was it built from the plan's config?") from None


def _swap(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, child = _parent(model, fqn)
    setattr(parent, child, new)


def _config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise DfplanError("apply_plan needs a dfplan Mamba2LM (model.config is missing)")
    return cfg


@torch.no_grad()
def round_to_storage_(t: torch.Tensor, storage: torch.dtype) -> None:
    """Round a float tensor in place to what `storage` can hold, keeping its dtype."""
    if t.is_floating_point() and t.dtype != storage:
        t.copy_(t.to(storage).to(t.dtype))


@torch.no_grad()
def apply_plan(model: nn.Module, plan, generator: torch.Generator | None = None,
               progress: bool = False, weight_fn=None) -> nn.Module:
    """Swap modules in place per `plan` (a formats.plan.Plan); returns the same model.

    Everything is validated (names, shapes, allowed formats) before the first module changes.
    generator seeds the zero-init corrections (V random) for reproducibility.
    weight_fn(unit, module) -> float (out, in) weight, if given, supplies the weight each
    compressed unit is quantised from instead of module.weight (packing random-init models
    one layer at a time, without ever materialising the float model).
    """
    cfg = _config(model)
    resolved = plan.resolve(cfg)                 # DfplanError on unknown names / bad shapes
    units = compressible_units(cfg)
    for u in units:
        mod = _get(model, u.name)
        if isinstance(mod, CompressedModule):
            raise DfplanError(f"{u.name} is already compressed ({mod.spec}); apply a plan to an "
                              f"uncompressed model")
        w = getattr(mod, "weight", None)
        if w is None or tuple(w.shape) != u.shape:
            raise DfplanError(f"{u.name}: expected a weight of shape {u.shape}, "
                              f"found {None if w is None else tuple(w.shape)}")
        module_for(resolved[u.name], u.kind)     # refuses e.g. a binary embedding
    it = units
    if progress:
        from tqdm import tqdm
        it = tqdm(units, desc="quantizing", unit="layer")
    for u in it:
        spec = resolved[u.name]
        mod = model.get_submodule(u.name)
        cls = module_for(spec, u.kind)
        if cls is None:                           # Keep: float module, values rounded
            round_to_storage_(mod.weight, getattr(torch, spec.torch_dtype_name))
            continue
        bias = getattr(mod, "bias", None)
        w = mod.weight if weight_fn is None else weight_fn(u, mod)
        new = cls.from_float(w, spec, bias=bias, generator=generator)
        _swap(model, u.name, new)
    storage = getattr(torch, plan.default.torch_dtype_name)
    sd = model.state_dict(keep_vars=True)
    for name, _ in fixed_tensors(cfg):
        if name in sd:
            round_to_storage_(sd[name].data if isinstance(sd[name], nn.Parameter) else sd[name], storage)
    model.dfplan_plan = plan
    return model


def prepare_empty(model: nn.Module, plan, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Swap in empty compressed modules (on meta) per `plan`, ready for load_state_dict(assign=True)."""
    cfg = _config(model)
    resolved = plan.resolve(cfg)
    for u in compressible_units(cfg):
        cls = module_for(resolved[u.name], u.kind)
        if cls is None:
            continue
        old = _get(model, u.name)
        has_bias = getattr(old, "bias", None) is not None
        _swap(model, u.name, cls.empty(resolved[u.name], u.shape, bias=has_bias, device="meta",
                                       compute_dtype=compute_dtype))
    model.dfplan_plan = plan
    return model


def compressed_modules(model: nn.Module) -> dict[str, CompressedModule]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedModule)}
