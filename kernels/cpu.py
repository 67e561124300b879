"""CPU kernels: build the C++ extension once (cached on disk), then call it.

The extension is compiled with torch.utils.cpp_extension on first use (or by `make setup`)
into a per-venv cache keyed by sources, flags, torch, python and compiler (kernels/build.py:
private build folder renamed into place, a lock no dead process can hold), so a rebuild
happens only when the source or the toolchain changes. Build failures (no compiler, ...)
warn once and leave `extension()` returning None; dispatch then uses the reference path.

The binary carries an AVX-512 VNNI, an AVX2 and a portable path and picks one at runtime.
After loading, the fastest path is checked once against the portable one on a small random
problem; a mismatch (a miscompiled or untested path on this CPU) demotes it with a warning
rather than returning wrong numbers.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from . import build
from .packing import ROW_BLOCKS, ROWS, pack_signs, reorder_torch_

ISA_NAMES = {0: "portable", 1: "avx2", 2: "avx512-vnni"}
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "linear_cpu.cpp", _CSRC / "int8_cpu.cpp", _CSRC / "step_cpu.cpp",
            _CSRC / "stack_cpu.cpp"]
_HEADERS = [_CSRC / "cpu_common.h"]
# No -march: the wide paths use function-level target attributes (see the source).
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
_NAME = "dfplan_kernels_cpu"

_lock = threading.Lock()
_state: dict = {}  # "ext": module | None, "isa": int, "error": str


def cache_root() -> Path:
    return build.cache_root()


def build_hash() -> str:
    return build.build_key(_SOURCES + _HEADERS, _CFLAGS, torch.__version__)


def _build():
    return build.load_or_build(_NAME, _SOURCES, _HEADERS, _CFLAGS, torch.__version__)


def _self_check(ext, isa: int) -> bool:
    """The chosen path must agree with the portable one on awkward shapes."""
    g = torch.Generator().manual_seed(1234)
    for tokens, out_f, in_f in ((1, 37, 203), (11, 70, 650), (9, 5, 64), (1, 200, 650)):
        x = torch.randn(tokens, in_f, generator=g)
        bits = pack_signs(torch.randn(out_f, in_f, generator=g))
        rs = torch.rand(out_f, generator=g) + 0.5
        a = ext.binary_linear(x, bits, rs, None, None, None, None, None, None, None, in_f, isa)
        b = ext.binary_linear(x, bits, rs, None, None, None, None, None, None, None, in_f, 0)
        q = torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int8)
        c = ext.int8_linear(x, q, rs, None, isa)
        d = ext.int8_linear(x, q, rs, None, 0)
        if not (torch.equal(a, b) and torch.equal(c, d)):
            return False
        # the row-block layout (one-token lookup kernel, or rows rebuilt per block), and
        # the C++ reorder into it against the torch one
        blocks = reorder_torch_(bits.clone(), True)
        again = bits.clone()
        ext.reorder_row_blocks_(again, True)
        if not torch.equal(again, blocks):
            return False
        e = ext.binary_linear(x, blocks, rs, None, None, None, None, None, None, None, in_f, isa,
                              None, ROW_BLOCKS)
        if not torch.equal(e, b):
            return False
        # fp32 side terms (FBI shift, low-rank correction) sum in another order: close, not equal
        r = 8 if tokens != 9 else 3
        kw = [torch.randn(in_f, generator=g), torch.randn(in_f, generator=g),
              torch.randint(-127, 128, (out_f, r), generator=g, dtype=torch.int8),
              torch.rand(out_f, generator=g),
              torch.randint(-127, 128, (r, in_f), generator=g, dtype=torch.int8),
              torch.rand(r, generator=g), torch.randn(out_f, generator=g)]
        a = ext.binary_linear(x, bits, None, *kw, in_f, isa)
        b = ext.binary_linear(x, bits, None, *kw, in_f, 0)
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max())):
            return False
    return True


def _load() -> None:
    if os.environ.get("DFPLAN_NO_CPP") == "1":
        _state.update(ext=None, isa=0, error="disabled by DFPLAN_NO_CPP=1")
        return
    try:
        ext = _build()
    except Exception as e:  # no compiler, headers, ninja, ... -> reference path
        msg = str(e).strip().splitlines()
        msg = msg[-1] if msg else type(e).__name__
        _state.update(ext=None, isa=0, error=msg)
        warnings.warn(f"dfplan: CPU kernels could not be built ({msg}); using the slow "
                      "pure-torch reference path", RuntimeWarning, stacklevel=3)
        return
    isa = int(ext.best_isa())
    while isa > 0 and not _self_check(ext, isa):
        warnings.warn(f"dfplan: the {ISA_NAMES[isa]} CPU kernel disagrees with the portable "
                      "one on this machine; not using it", RuntimeWarning, stacklevel=3)
        isa -= 1
    _state.update(ext=ext, isa=isa, error=None)


def extension():
    """The compiled module, or None when it cannot be built (warned once)."""
    if "ext" not in _state:
        with _lock:
            if "ext" not in _state:
                _load()
    return _state["ext"]


def available() -> bool:
    return extension() is not None


def best_isa() -> int:
    """Instruction-set level the kernels use: 0 portable, 1 AVX2, 2 AVX-512 VNNI."""
    extension()
    return _state["isa"]


def build_error() -> str | None:
    extension()
    return _state["error"]


def binary_linear_cpu(x2, bits, row_scale, in_features, col_scale=None, col_shift=None,
                      u=None, u_scale=None, v=None, v_scale=None, bias=None, isa=None, out=None,
                      layout: int = ROWS):
    """x2 (T, in) float32 contiguous -> (T, out) float32. Arguments already validated.

    isa: force an instruction-set level (tests); out: a float32 (T, out) tensor to write into;
    layout: packing.ROWS, or packing.ROW_BLOCKS for bits from packing.to_row_blocks.
    """
    ext = extension()
    return ext.binary_linear(x2, bits, row_scale, col_scale, col_shift, u, u_scale, v, v_scale,
                             bias, in_features, _state["isa"] if isa is None else isa, out, layout)


def int8_linear_cpu(x2, qweight, scale, bias=None, isa=None, out=None):
    """x2 (T, in) float32 contiguous -> (T, out) float32. Arguments already validated."""
    ext = extension()
    return ext.int8_linear(x2, qweight, scale, bias, _state["isa"] if isa is None else isa, out)


def mamba2_step_cpu(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                    norm_weight, eps, ngroups, headdim, d_state, norm_before_gate=False,
                    use_avx2=None):
    """Fused decode step; every tensor float32 and contiguous (dispatch checks)."""
    ext = extension()
    if use_avx2 is None:
        use_avx2 = _state["isa"] >= 1
    return ext.mamba2_step(zxbcdt, conv_state, ssm_state, conv_weight.reshape(conv_weight.shape[0], -1),
                           conv_bias, dt_bias, A_log, D, norm_weight, float(eps), int(ngroups),
                           int(headdim), int(d_state), bool(norm_before_gate), bool(use_avx2))
