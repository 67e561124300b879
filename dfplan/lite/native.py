"""The torch-free kernel library: compiled once per venv from the torch extension's own
sources with -DDFPLAN_LITE (kernels/csrc/lite_cpu.cpp adds the C ABI), loaded with ctypes.

The build shares the torch extension's cache and lock (dfplan.kernels.build): a private
folder renamed into place, so a killed build never leaves a library that loads half-made.
It needs a C++ compiler with OpenMP, as the torch extension does, and nothing from torch.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import threading
from pathlib import Path

from ..errors import DfplanError
from ..kernels import build

_CSRC = Path(build.__file__).parent / "csrc"
_SOURCES = [_CSRC / "linear_cpu.cpp", _CSRC / "int8_cpu.cpp", _CSRC / "step_cpu.cpp",
            _CSRC / "lite_cpu.cpp"]
_HEADERS = [_CSRC / "cpu_common.h"]
# as the torch extension: no -march, the wide paths carry function-level target attributes
_CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp", "-std=c++17", "-fPIC", "-DDFPLAN_LITE"]
_NAME = "dfplan_lite"
ABI_VERSION = 5

_lock = threading.Lock()
_lib: list = []

c_f32p = ctypes.POINTER(ctypes.c_float)


class RowVec(ctypes.Structure):
    _fields_ = [("f32", ctypes.c_void_p), ("f16", ctypes.c_void_p)]


class BinaryWeights(ctypes.Structure):
    """cpu_common.h BinaryWeights: one 1-bit linear's pointers and sizes."""
    _fields_ = [("bits", ctypes.c_void_p), ("out", ctypes.c_int64), ("in_", ctypes.c_int64),
                ("nb", ctypes.c_int64), ("layout", ctypes.c_int64), ("row_scale", RowVec),
                ("bias", RowVec), ("u_scale", RowVec), ("col_scale", ctypes.c_void_p),
                ("col_shift", ctypes.c_void_p), ("u", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("v_scale", ctypes.c_void_p), ("r", ctypes.c_int64)]


class Int8Weights(ctypes.Structure):
    """lite_cpu.cpp Int8Weights: a row-wise int8 projection (codes, fp32 scale, bias)."""
    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("in_", ctypes.c_int64)]


class FloatWeights(ctypes.Structure):
    """lite_cpu.cpp FloatWeights: a float weight as stored (dtype 0 fp32, 1 fp16, 2 bf16)."""
    _fields_ = [("w", ctypes.c_void_p), ("dtype", ctypes.c_int64), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("in_", ctypes.c_int64)]


FLOAT_DTYPES = {"F32": 0, "F16": 1, "BF16": 2}


class StepWeights(ctypes.Structure):
    """cpu_common.h StepWeights: one mixer's fixed tensors (fp32) and sizes."""
    _fields_ = [("conv_w", ctypes.c_void_p), ("conv_b", ctypes.c_void_p), ("dt_bias", ctypes.c_void_p),
                ("A_log", ctypes.c_void_p), ("D", ctypes.c_void_p), ("norm_w", ctypes.c_void_p),
                ("eps", ctypes.c_double), ("H", ctypes.c_int64), ("P", ctypes.c_int64),
                ("N", ctypes.c_int64), ("G", ctypes.c_int64), ("conv_dim", ctypes.c_int64),
                ("d_conv", ctypes.c_int64), ("d_per_channel", ctypes.c_bool),
                ("norm_before_gate", ctypes.c_bool)]


_SIGNATURES = {
    "dfl_last_error": (ctypes.c_char_p, []),
    "dfl_abi": (ctypes.c_int64, [ctypes.c_int64]),
    "dfl_best_isa": (ctypes.c_int64, []),
    "dfl_has_f16c": (ctypes.c_int, []),
    "dfl_set_threads": (None, [ctypes.c_int]),
    "dfl_widen16": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]),
    "dfl_reorder_row_blocks": (None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]),
    "dfl_create": (ctypes.c_void_p, [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_int64]),
    "dfl_destroy": (None, [ctypes.c_void_p]),
    "dfl_add_layer": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_double,
                                     ctypes.POINTER(BinaryWeights), ctypes.POINTER(Int8Weights),
                                     ctypes.POINTER(FloatWeights), ctypes.POINTER(BinaryWeights),
                                     ctypes.POINTER(Int8Weights), ctypes.POINTER(FloatWeights),
                                     ctypes.POINTER(StepWeights)]),
    "dfl_unpack_intn": (None, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                               ctypes.c_void_p]),
    "dfl_set_head": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.POINTER(FloatWeights), ctypes.c_void_p, ctypes.c_double]),
    "dfl_reset": (None, [ctypes.c_void_p]),
    "dfl_state_bytes": (ctypes.c_int64, [ctypes.c_void_p]),
    "dfl_forward": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]),
    "dfl_sample": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int64,
                                    ctypes.c_double, ctypes.c_double]),
}


def _compile(name: str, sources: list[Path], flags: list[str], build_dir: Path):
    """Each source to an object in parallel (the machine has two cores), then one link."""
    cxx = os.environ.get("CXX", "c++")
    objs, procs = [], []
    for src in sources:
        obj = build_dir / (src.stem + ".o")
        objs.append(obj)
        procs.append((src, subprocess.Popen([cxx, *flags, "-c", str(src), "-o", str(obj)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    errors = []
    for src, p in procs:
        out, _ = p.communicate()
        if p.returncode:
            errors.append(f"{src.name}: {out.strip()[-2000:]}")
    if errors:
        raise RuntimeError("compiling the dfplan lite library failed:\n" + "\n".join(errors))
    so = build_dir / f"{name}.so"
    r = subprocess.run([cxx, "-shared", "-fopenmp", *map(str, objs), "-o", str(so)],
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"linking the dfplan lite library failed: {r.stderr.strip()[-2000:]}")
    return _open(name, so)


def _open(name: str, so: Path):
    lib = ctypes.CDLL(str(so))
    for fn, (res, args) in _SIGNATURES.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


def build_key() -> str:
    return build.build_key(_SOURCES + _HEADERS, _CFLAGS, "no-torch")


def library():
    """The loaded library (compiled on first use); DfplanError when it cannot be built."""
    if not _lib:
        with _lock:
            if not _lib:
                try:
                    lib = build.load_or_build(_NAME, _SOURCES, _HEADERS, _CFLAGS, "no-torch",
                                              compile_fn=_compile, loader=_open)
                except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                    lines = str(e).strip().splitlines() or [type(e).__name__]
                    first = next((ln.strip() for ln in lines if "error" in ln), lines[-1].strip())
                    raise DfplanError("the torch-free runtime needs a C++ compiler with OpenMP "
                                      f"(g++); building it failed: {first[:300]}; "
                                      "use --runtime torch instead") from None
                want = (ABI_VERSION, ctypes.sizeof(BinaryWeights), ctypes.sizeof(StepWeights),
                        ctypes.sizeof(RowVec), ctypes.sizeof(Int8Weights), ctypes.sizeof(FloatWeights))
                got = tuple(lib.dfl_abi(i) for i in range(len(want)))
                if got != want:
                    raise DfplanError(f"the lite library's ABI {got} does not match its Python side {want}; "
                                      "remove the kernel cache and run again")
                _lib.append(lib)
    return _lib[0]


def last_error() -> str:
    return (library().dfl_last_error() or b"").decode(errors="replace")


def check(rc: int, what: str) -> None:
    if rc != 0:
        raise DfplanError(f"{what}: {last_error()}")
