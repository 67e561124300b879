"""int8 x int8 GEMV through torch's fbgemm (dynamic-quantized linear) for CPU decoding.

fbgemm packs the int8 weight once (prepack) and quantizes the activations per call. Its
activation scale is per tensor, so each token row is passed alone: a row's result never
depends on the other rows of the batch (batch == one at a time), like our per-token kernel.

Opt-in (DFPLAN_FBGEMM=1): since our int8 kernel prefetches its weight stream and runs on
torch's threads it is about as fast on the 1.3B head (50,288 x 2,048, batch 1, from memory,
`dfplan bench kernels --model 1.3b --batch 1 --units lm_head`: ours 3.83 / 2.38 ms, fbgemm
3.52 / 2.89 ms on 1 / 2 threads), and the prepacked copy costs as many bytes again as the
int8 weight (+103 MB resident on 1.3B).
"""
from __future__ import annotations

import os
import warnings

import torch

MAX_ROWS = 16        # above this a prefill/eval batch goes to the per-token kernel instead


def available() -> bool:
    if os.environ.get("DFPLAN_FBGEMM", "0") != "1":
        return False
    return "fbgemm" in torch.backends.quantized.supported_engines


def prepack(qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
    """int8 (out, in) codes with per-row scale (out,) -> fbgemm's packed weight."""
    with warnings.catch_warnings():     # quantized-tensor constructors warn of deprecation
        warnings.simplefilter("ignore")
        if torch.backends.quantized.engine != "fbgemm":
            torch.backends.quantized.engine = "fbgemm"
        zeros = torch.zeros(qweight.shape[0], dtype=torch.int64)
        qw = torch._make_per_channel_quantized_tensor(qweight.contiguous(), scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())


def reduce_range() -> bool:
    """Quantize activations to 7 bits where the CPU has no VNNI. fbgemm's AVX2 path sums
    pairs of u8 x s8 products in saturating int16 (vpmaddubsw): with 8-bit activations the
    head was off by 8% (relative L2, tests/test_runtime_fast.py) on an AVX2-only host, 1.1%
    with 7 bits (our int8 kernel: 0.6%)."""
    from .cpu import best_isa
    return best_isa() < 2


def linear(x2: torch.Tensor, packed) -> torch.Tensor:
    """x2 (T, in) float32, T <= MAX_ROWS -> (T, out) float32, one call per token row."""
    rr = reduce_range()
    if x2.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(x2, packed, rr)
    return torch.cat([torch.ops.quantized.linear_dynamic(r, packed, rr) for r in x2.split(1)])
