"""Kernels for dfplan's compressed formats: pure-torch reference twins (linear_ref.py, step_ref.py), C++ CPU
kernels (cpu.py, csrc/), Triton GPU kernels (triton_*.py) and the dispatch between them."""
from .dispatch import (
    MODES,
    binary_linear,
    int8_embedding,
    int8_linear,
    kernel_mode,
    mamba2_step,
    preferred_bits_layout,
    select_backend,
)
from .linear_ref import (
                       binary_dequantize_ref,
                       binary_linear_ref,
                       int8_linear_ref,
                       intn_dequantize_ref,
                       intn_embedding_ref,
                       intn_linear_ref,
                       quantize_activations_ref,
)
from .step_ref import mamba2_step_ref

__all__ = [
    "MODES", "binary_linear", "int8_linear", "int8_embedding", "kernel_mode", "select_backend",
    "preferred_bits_layout",
    "mamba2_step", "mamba2_step_ref",
    "binary_linear_ref", "binary_dequantize_ref", "int8_linear_ref", "intn_dequantize_ref",
    "intn_linear_ref", "intn_embedding_ref", "quantize_activations_ref",
]
