"""Layer format specs: what a weight becomes in the packed checkpoint, and its exact bytes.

A spec is a small frozen (hashable) dataclass. `spec.payload(shape)` lists every tensor the
packed checkpoint stores for one weight of `shape` = (out, in): buffer name, shape, dtype and
role. The compressed modules allocate exactly these buffers, the checkpoint writer writes
exactly these buffers, and `spec.nbytes(shape)` is the sum of their sizes, so the size a plan
predicts is the size of the payload written (the safetensors JSON header aside).

No torch here: the planner calls `nbytes` / `parse_spec` millions of times.

Storage layouts (all row-major; "row" = one output row of the weight):

Keep(dtype)         weight (out, in) in fp32 / bf16 / fp16.

IntN(bits, group, symmetric)
    Codes are quantised per row (group=0) or per group of `group` consecutive input columns.
    symmetric:  w ~= q * scale,            q in [-2^(b-1), 2^(b-1)-1], scale = absmax / (2^(b-1)-1)
    asymmetric: w ~= (c - zero) * scale,   c in [0, 2^b - 1], zero an integer in [0, 2^b - 1]
    `qweight`:
      - 8-bit symmetric: int8 (out, in), the two's-complement value q itself (the int8 kernel
        layout);
      - otherwise uint8 (out, ceil(in * b / 8)): each row is an LSB-first bitstream of unsigned
        b-bit codes; code j occupies stream bits [j*b, j*b + b), stream bit k is bit k % 8 of
        byte k // 8. Symmetric codes are offset binary, c = q + 2^(b-1). So 4-bit puts column
        2m in the low nibble of byte m and 2m+1 in the high nibble, 2-bit puts four columns per
        byte starting at the low bits, and 3-bit rows are a dense bitstream (codes may straddle
        bytes). Padding bits at the end of a row are 0.
    `scale`: fp16 (out,) for per-row, (out, in / group) for groups.
    `zero`: asymmetric only, uint8 with the shape of `scale`.

Binary(scale, rank, rank_bits)
    `bits`: uint8 (out, ceil(in / 8)), the sign matrix S in the layout of kernels/packing.py:
      LSB-first (column j is bit j % 8 of byte j // 8), bit 1 = +1, bit 0 = -1, an exact zero
      packs as +1, padding bits 0 and ignored.
    scale "row": `row_scale` fp16 (out,), W_hat[o, i] = row_scale[o] * S[o, i].
    scale "fbi": `col_scale`, `col_shift` fp16 (in,), W_hat[o, i] = col_scale[i] * S[o, i] + col_shift[i]
      (Bi-Mamba's FBI-Linear; S = sign(W - col_shift)).
    rank r > 0 adds U @ V, U (out, r), V (r, in), each quantised symmetrically per row with
      `rank_bits` bits: `u` / `v` are int8 when rank_bits = 8, else uint8 bitstreams in the IntN
      layout above (rows of U have r codes, rows of V have `in` codes); `u_scale` fp16 (out,),
      `v_scale` fp16 (r,).

Biases are not part of a spec: they are stored under the plan's default Keep dtype.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Union

from ..errors import DfplanError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
KEEP_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
INT_BITS = (8, 4, 3, 2)
BINARY_SCALES = ("row", "fbi")
LOWRANK_INITS = ("svd", "zero")


class Tensor(NamedTuple):
    """One stored tensor of a spec's payload."""
    name: str      # buffer name inside the module; state_dict key = f"{unit}.{name}"
    shape: tuple
    dtype: str     # torch dtype name without the "torch." prefix
    role: str      # weight | codes | bits | scales | zeros | correction

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for s in self.shape:
            n *= s
        return n


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of one row of n codes of `bits` bits in the LSB-first bitstream layout."""
    return (n * bits + 7) // 8


def _shape2(shape) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise DfplanError(f"a layer spec needs a 2-D (out, in) weight shape, got {shape!r}") from None
    if out_f <= 0 or in_f <= 0:
        raise DfplanError(f"weight shape {shape!r} has a non-positive dimension")
    return out_f, in_f


def _intn_codes_tensor(name: str, rows: int, cols: int, bits: int, signed8: bool, role: str) -> Tensor:
    if bits == 8:
        return Tensor(name, (rows, cols), "int8" if signed8 else "uint8", role)
    return Tensor(name, (rows, packed_bytes(cols, bits)), "uint8", role)


class _SpecBase:
    """Shared behaviour: exact bytes from the payload, validation before any work."""

    def payload(self, shape) -> tuple[Tensor, ...]:
        return _payload_cached(self, _shape2(shape))

    def nbytes(self, shape) -> int:
        return _nbytes_cached(self, _shape2(shape))

    def params(self, shape) -> int:
        out_f, in_f = _shape2(shape)
        return out_f * in_f

    def validate(self, shape) -> None:
        self._check(*_shape2(shape))

    def bits_per_weight(self, shape) -> float:
        out_f, in_f = _shape2(shape)
        return 8.0 * self.nbytes(shape) / (out_f * in_f)

    def __str__(self) -> str:
        return self.name

    # subclasses implement
    def _check(self, out_f: int, in_f: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _payload(self, out_f: int, in_f: int) -> tuple[Tensor, ...]:  # pragma: no cover
        raise NotImplementedError


@lru_cache(maxsize=65536)
def _payload_cached(spec, shape: tuple[int, int]) -> tuple[Tensor, ...]:
    spec._check(*shape)
    return spec._payload(*shape)


@lru_cache(maxsize=65536)
def _nbytes_cached(spec, shape: tuple[int, int]) -> int:
    return sum(t.nbytes for t in _payload_cached(spec, shape))


@dataclass(frozen=True)
class Keep(_SpecBase):
    dtype: str = "fp16"

    def __post_init__(self):
        if self.dtype not in KEEP_DTYPES:
            raise DfplanError(f"Keep dtype {self.dtype!r} is not one of {', '.join(KEEP_DTYPES)}")

    @property
    def name(self) -> str:
        return self.dtype

    @property
    def torch_dtype_name(self) -> str:
        return KEEP_DTYPES[self.dtype]

    def tensor_nbytes(self, shape) -> int:
        """Bytes of any tensor (1-D bias, 3-D conv weight) stored in this dtype."""
        n = DTYPE_BYTES[self.torch_dtype_name]
        for s in shape:
            n *= int(s)
        return n

    def _check(self, out_f, in_f):
        pass

    def _payload(self, out_f, in_f):
        return (Tensor("weight", (out_f, in_f), self.torch_dtype_name, "weight"),)


@dataclass(frozen=True)
class IntN(_SpecBase):
    bits: int
    group: int = 0
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in INT_BITS:
            raise DfplanError(f"IntN bits={self.bits} is not supported; use one of {INT_BITS}")
        if self.group < 0:
            raise DfplanError(f"IntN group={self.group} must be 0 (per row) or a positive group size")

    @property
    def name(self) -> str:
        s = f"int{self.bits}"
        if self.group:
            s += f"g{self.group}"
        if not self.symmetric:
            s += "a"
        return s

    def n_groups(self, in_f: int) -> int:
        return in_f // self.group if self.group else 1

    def _check(self, out_f, in_f):
        if self.group and in_f % self.group:
            raise DfplanError(f"{self.name}: group size {self.group} does not divide the row length "
                              f"{in_f} of a ({out_f}, {in_f}) weight; pick a group that divides {in_f}")

    def _payload(self, out_f, in_f):
        g = self.n_groups(in_f)
        sshape = (out_f,) if g == 1 and not self.group else (out_f, g)
        ts = [_intn_codes_tensor("qweight", out_f, in_f, self.bits, self.symmetric, "codes"),
              Tensor("scale", sshape, "float16", "scales")]
        if not self.symmetric:
            ts.append(Tensor("zero", sshape, "uint8", "zeros"))
        return tuple(ts)


@dataclass(frozen=True)
class Binary(_SpecBase):
    scale: str = "row"
    rank: int = 0
    rank_bits: int = 8
    init: str = "svd"   # how the correction starts; not part of the name (same bytes)

    def __post_init__(self):
        if self.scale not in BINARY_SCALES:
            raise DfplanError(f"Binary scale={self.scale!r} is not one of {BINARY_SCALES}")
        if self.rank < 0:
            raise DfplanError(f"Binary rank={self.rank} must be >= 0")
        if self.rank_bits not in INT_BITS:
            raise DfplanError(f"Binary rank_bits={self.rank_bits} is not one of {INT_BITS}")
        if self.init not in LOWRANK_INITS:
            raise DfplanError(f"Binary init={self.init!r} is not one of {LOWRANK_INITS}")

    @property
    def name(self) -> str:
        s = "bin" if self.scale == "row" else "fbi"
        if self.rank:
            s += f"+r{self.rank}"
            if self.rank_bits != 8:
                s += f"i{self.rank_bits}"
        return s

    def _check(self, out_f, in_f):
        if self.rank > min(out_f, in_f):
            raise DfplanError(f"{self.name}: rank {self.rank} exceeds min(out, in) = {min(out_f, in_f)} "
                              f"of a ({out_f}, {in_f}) weight; use a rank <= {min(out_f, in_f)}")

    def _payload(self, out_f, in_f):
        ts = [Tensor("bits", (out_f, (in_f + 7) // 8), "uint8", "bits")]
        if self.scale == "row":
            ts.append(Tensor("row_scale", (out_f,), "float16", "scales"))
        else:
            ts += [Tensor("col_scale", (in_f,), "float16", "scales"),
                   Tensor("col_shift", (in_f,), "float16", "scales")]
        if self.rank:
            r, b = self.rank, self.rank_bits
            ts += [_intn_codes_tensor("u", out_f, r, b, True, "correction"),
                   Tensor("u_scale", (out_f,), "float16", "correction"),
                   _intn_codes_tensor("v", r, in_f, b, True, "correction"),
                   Tensor("v_scale", (r,), "float16", "correction")]
        return tuple(ts)


Spec = Union[Keep, IntN, Binary]

_INT_RE = re.compile(r"^int(\d+)(?:g(\d+))?(a?)$")
_BIN_RE = re.compile(r"^(bin|fbi)(?:\+r(\d+)(?:i(\d+))?)?$")


@lru_cache(maxsize=4096)
def parse_spec(name: str) -> Spec:
    """Inverse of str(spec): "fp16", "int4g128a", "bin+r16", "bin+r16i4", "fbi+r8", ..."""
    if not isinstance(name, str):
        raise DfplanError(f"a format name must be a string, got {name!r}")
    s = name.strip().lower()
    if s in KEEP_DTYPES:
        return Keep(s)
    m = _INT_RE.match(s)
    if m:
        return IntN(int(m.group(1)), int(m.group(2) or 0), symmetric=not m.group(3))
    m = _BIN_RE.match(s)
    if m:
        return Binary("row" if m.group(1) == "bin" else "fbi", int(m.group(2) or 0), int(m.group(3) or 8))
    raise DfplanError(f"unknown format {name!r}; expected fp32/bf16/fp16, int8/int4/int3/int2 "
                      f"(optionally gN for groups, a for asymmetric), bin/fbi (optionally +rN, +rNiB)")


def spec_to_json(spec: Spec):
    """JSON form: the short name, or {"format": name, "init": ...} when init is not the default."""
    if isinstance(spec, Binary) and spec.rank and spec.init != "svd":
        return {"format": spec.name, "init": spec.init}
    return spec.name


def spec_from_json(obj, where: str = "spec") -> Spec:
    if isinstance(obj, str):
        return parse_spec(obj)
    if isinstance(obj, dict) and "format" in obj:
        extra = set(obj) - {"format", "init"}
        if extra:
            raise DfplanError(f"{where}: unknown fields {sorted(extra)} (allowed: format, init)")
        spec = parse_spec(obj["format"])
        if "init" in obj:
            if not isinstance(spec, Binary):
                raise DfplanError(f"{where}: 'init' only applies to bin/fbi formats, not {spec.name}")
            spec = Binary(spec.scale, spec.rank, spec.rank_bits, init=obj["init"])
        return spec
    raise DfplanError(f"{where}: expected a format name or {{\"format\": ..., \"init\": ...}}, got {obj!r}")


DEFAULT_CANDIDATES: tuple[Spec, ...] = (
    *(Binary("row", r) for r in (0, 8, 16, 32, 64, 128)),
    *(IntN(b) for b in (2, 3, 4, 8)),
    Keep("fp16"),
)
