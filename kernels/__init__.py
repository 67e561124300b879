"""Kernels for dfplan's compressed formats: pure-torch reference twins (linear_ref.py, step_ref.py), C++ CPU
kernels (cpu.py, csrc/), Triton GPU kernels (triton_*.py) and the dispatch between them.

The names below are imported on first use, so that `dfplan.kernels.build` (which the
torch-free runtime, dfplan/lite, uses to compile its library) does not import torch.
"""
import importlib

_FROM = {
    "MODES": "dispatch", "binary_linear": "dispatch", "int8_embedding": "dispatch",
    "int8_linear": "dispatch", "kernel_mode": "dispatch", "mamba2_step": "dispatch",
    "preferred_bits_layout": "dispatch", "select_backend": "dispatch",
    "binary_dequantize_ref": "linear_ref", "binary_linear_ref": "linear_ref",
    "int8_linear_ref": "linear_ref", "intn_dequantize_ref": "linear_ref",
    "intn_embedding_ref": "linear_ref", "intn_linear_ref": "linear_ref",
    "quantize_activations_ref": "linear_ref", "mamba2_step_ref": "step_ref",
}

__all__ = list(_FROM)


def __getattr__(name):
    mod = _FROM.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
