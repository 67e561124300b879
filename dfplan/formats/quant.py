"""Quantisation maths as plain tensor functions (reused by quantization-aware training).

Conventions (see specs.py for the stored layouts):
- IntN symmetric: q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1), w_hat = q * s,
  s = clip * absmax / (2^(b-1) - 1) per row or group, stored fp16.
- IntN asymmetric: c = clamp(round(w / s) + z, 0, 2^b - 1), w_hat = (c - z) * s,
  s = (hi - lo) / (2^b - 1), z = round(-lo / s) (an integer, so w = 0 is exact).
- For bits <= 4 the clip ratio is searched per row/group on a small grid to minimise the
  squared error (absmax wastes most levels on Gaussian tails); 8-bit uses plain absmax.
- Every quantiser rounds its scales to fp16 FIRST and then quantises against the rounded
  scale, so dequantising the stored tensors reproduces exactly what was optimised.
- Binary: S = sign(w) with sign(0) := +1 (kernels/packing.py), row_scale = mean |w| of the row.
  FBI: col_shift = column mean, S = sign(w - col_shift), col_scale = mean |w - col_shift|.
- Low-rank correction of a residual R (out, in): U (out, r), V (r, in), R ~= U @ V, init "svd"
  (best rank-r approximation, singular values split evenly, U = U_r sqrt(s), V = sqrt(s) V_r^T)
  or "zero" (U = 0, V ~ N(0, 1/in), DF-SSM's start); U and V are then quantised per row.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch

from dfplan.kernels.packing import pack_signs, unpack_signs

from ..errors import DfplanError
from .specs import Binary, IntN, Keep

# clip ratios tried per row/group for bits <= 4: geometric from 1 down to a per-width floor
# (the MSE-optimal ratio on Gaussian rows is ~0.7 at 4 bits, ~0.5 at 3, ~0.3 at 2, and lower
# for heavy tails), then one refinement half a step either side of each row's winner
_CLIP_FLOOR = {4: 0.3, 3: 0.15, 2: 0.08}
_CLIP_STEPS = 10


def _clip_grid(bits: int) -> list[float]:
    lo = _CLIP_FLOOR.get(bits, 0.5)
    return [lo ** (k / (_CLIP_STEPS - 1)) for k in range(_CLIP_STEPS)]
_ROW_CHUNK = 4096                                       # rows per block: bounds temporaries


class IntNQuant(NamedTuple):
    q: torch.Tensor                 # (out, in) int16 values: signed q (symmetric) or codes c
    scale: torch.Tensor             # fp16 (out,) per row or (out, G) per group
    zero: torch.Tensor | None       # uint8 like scale (asymmetric) or None


class LowRank(NamedTuple):
    u: torch.Tensor                 # (out, r) int16 signed values
    u_scale: torch.Tensor           # fp16 (out,)
    v: torch.Tensor                 # (r, in) int16 signed values
    v_scale: torch.Tensor           # fp16 (r,)


# -- IntN ----------------------------------------------------------------------------------

def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    if group and in_f % group:
        raise DfplanError(f"group size {group} does not divide the row length {in_f}")
    g = group or in_f
    return w.reshape(out_f * (in_f // g), g)                           # (out * G, g)


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    # clamp into fp16 range so a huge row saturates instead of turning into inf
    return s.clamp(max=65504.0).to(torch.float16)


def _scales_sym(x: torch.Tensor, ratio: torch.Tensor, bits: int):
    """(R, g) rows, (R,) clip ratios -> (fp16 scale (R,), None)."""
    qmax = 2 ** (bits - 1) - 1
    return _fp16_scale(x.abs().amax(-1) * ratio / qmax), None


def _scales_asym(x: torch.Tensor, ratio: torch.Tensor, bits: int):
    cmax = 2 ** bits - 1
    lo = (x.amin(-1) * ratio).clamp(max=0.0)                           # keep 0 representable
    hi = (x.amax(-1) * ratio).clamp(min=0.0)
    s16 = _fp16_scale((hi - lo) / cmax)
    s = s16.float()
    z = torch.round(-lo / torch.where(s > 0, s, torch.ones_like(s))).clamp_(0, cmax)
    return s16, z


def _codes(x: torch.Tensor, s16: torch.Tensor, z: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round rows against their (already fp16) scales; a zero scale gives code 0 / z."""
    s = s16.float()
    inv = torch.where(s > 0, 1.0 / s.clamp(min=1e-30), torch.zeros_like(s)).unsqueeze(-1)
    q = torch.round(x * inv)
    if z is None:
        return q.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q.add_(z.unsqueeze(-1)).clamp_(0, 2 ** bits - 1)


def _row_err(x, q, s16, z) -> torch.Tensor:
    if z is not None:
        q = q - z.unsqueeze(-1)
    return q.mul_(s16.float().unsqueeze(-1)).sub_(x).square_().sum(-1)


def _quantize_block(x: torch.Tensor, bits: int, symmetric: bool, clip: bool):
    scales = _scales_sym if symmetric else _scales_asym
    ones = torch.ones(x.shape[0], device=x.device)
    if clip:
        # only the winning ratio per row is kept, so each candidate costs one pass
        grid = _clip_grid(bits)
        half = (grid[1] / grid[0]) ** 0.5
        best_r, best_err = ones, None
        candidates = [torch.full_like(ones, r) for r in grid]
        for step in range(2):
            for ratio in candidates:
                s16, z = scales(x, ratio, bits)
                err = _row_err(x, _codes(x, s16, z, bits), s16, z)
                if best_err is None:
                    best_err, best_r = err, ratio
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_r = torch.where(better, ratio, best_r)
            candidates = [(best_r * half).clamp(max=1.0), (best_r / half).clamp(max=1.0)]
        s16, z = scales(x, best_r, bits)
    else:
        s16, z = scales(x, ones, bits)
    return _codes(x, s16, z, bits), s16, z


def quantize_intn(w: torch.Tensor, bits: int, group: int = 0, symmetric: bool = True,
                  clip: bool | None = None) -> IntNQuant:
    """Quantise a (out, in) weight per row (group 0) or per `group` input columns.

    clip: search the clipping ratio per row/group (default: on for bits <= 4).
    """
    if w.dim() != 2:
        raise DfplanError(f"quantize_intn expects a 2-D weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    clip = bits <= 4 if clip is None else clip
    x_all = _groups(w.detach().float(), group)                         # (R, g)
    qs, ss, zs = [], [], []
    for x in x_all.split(_ROW_CHUNK):
        q, s16, z = _quantize_block(x, bits, symmetric, clip)
        qs.append(q.to(torch.int16))
        ss.append(s16)
        if z is not None:
            zs.append(z.to(torch.uint8))
    sshape = (out_f, in_f // group) if group else (out_f,)
    q = torch.cat(qs).reshape(out_f, in_f)
    scale = torch.cat(ss).reshape(sshape)
    zero = torch.cat(zs).reshape(sshape) if zs else None
    return IntNQuant(q, scale, zero)


def dequantize_intn(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                    dtype=torch.float32) -> torch.Tensor:
    """(out, in) values/codes + fp16 scales (out,) or (out, G) -> (out, in) float."""
    out_f, in_f = q.shape
    s = scale.float().reshape(out_f, -1, 1)                             # (out, G, 1)
    x = q.float().reshape(out_f, s.shape[1], -1)                        # (out, G, g)
    if zero is not None:
        x = x - zero.float().reshape(out_f, -1, 1)
    return (x * s).reshape(out_f, in_f).to(dtype)


def fake_quant_intn(w: torch.Tensor, bits: int, group: int = 0, symmetric: bool = True,
                    clip: bool | None = None) -> torch.Tensor:
    """w -> dequantize(quantize(w)) in w's dtype (no gradient trick; wrap with an STE for QAT)."""
    return dequantize_intn(*quantize_intn(w, bits, group, symmetric, clip), dtype=w.dtype)


# -- bit packing of b-bit codes (LSB-first per-row bitstream) -------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, n) unsigned codes < 2^bits -> uint8 (R, ceil(n * bits / 8)), LSB-first bitstream."""
    rows, n = codes.shape
    c = codes.to(torch.int32)
    if bits == 8:
        return c.to(torch.uint8)
    nbytes = (n * bits + 7) // 8
    if 8 % bits == 0:                                                   # 2 and 4 bits: whole codes per byte
        per = 8 // bits
        c = torch.nn.functional.pad(c, (0, nbytes * per - n)).view(rows, nbytes, per)
        shifts = torch.arange(per, dtype=torch.int32, device=c.device) * bits
        return (c << shifts).sum(-1, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(rows, nbytes, dtype=torch.uint8, device=c.device)
    weights = 1 << torch.arange(8, dtype=torch.int32, device=c.device)
    for i in range(0, rows, _ROW_CHUNK):
        blk = c[i:i + _ROW_CHUNK]
        b = (blk.unsqueeze(-1) >> torch.arange(bits, dtype=torch.int32, device=c.device)) & 1     # (r, n, bits)
        b = torch.nn.functional.pad(b.reshape(blk.shape[0], -1), (0, nbytes * 8 - n * bits))
        out[i:i + _ROW_CHUNK] = (b.view(blk.shape[0], nbytes, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return out


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """uint8 (R, ceil(n * bits / 8)) -> int16 (R, n) unsigned codes."""
    rows, nbytes = packed.shape
    if nbytes != (n * bits + 7) // 8:
        raise DfplanError(f"packed row of {nbytes} bytes does not hold {n} codes of {bits} bits")
    p = packed.to(torch.int16)
    if bits == 8:
        return p
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int16, device=p.device) * bits
        return ((p.unsqueeze(-1) >> shifts) & (2 ** bits - 1)).reshape(rows, -1)[:, :n]
    out = torch.empty(rows, n, dtype=torch.int16, device=p.device)
    weights = 1 << torch.arange(bits, dtype=torch.int16, device=p.device)
    for i in range(0, rows, _ROW_CHUNK):
        blk = p[i:i + _ROW_CHUNK]
        b = ((blk.unsqueeze(-1) >> torch.arange(8, dtype=torch.int16, device=p.device)) & 1).reshape(blk.shape[0], -1)
        b = b[:, :n * bits].reshape(blk.shape[0], n, bits)
        out[i:i + _ROW_CHUNK] = (b * weights).sum(-1, dtype=torch.int16)
    return out


def pack_intn(q: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Values from quantize_intn -> the stored `qweight` (int8 for 8-bit symmetric, else uint8)."""
    if symmetric and bits == 8:
        return q.to(torch.int8)
    codes = q + 2 ** (bits - 1) if symmetric else q                    # offset binary
    return pack_codes(codes, bits)


def unpack_intn(stored: torch.Tensor, n: int, bits: int, symmetric: bool) -> torch.Tensor:
    """Inverse of pack_intn -> int16 (R, n) values (signed for symmetric)."""
    if symmetric and bits == 8:
        return stored.to(torch.int16)
    codes = unpack_codes(stored, n, bits)
    return codes - 2 ** (bits - 1) if symmetric else codes


# -- 1-bit scaffolds -----------------------------------------------------------------------

def signs(w: torch.Tensor) -> torch.Tensor:
    """+1 / -1 with sign(0) := +1 (the packing convention), in w's dtype."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


def binarize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) -> (S (out, in) +-1 float32, row_scale fp16 (out,) = mean |w| of the row)."""
    w = w.detach().float()
    return signs(w), _fp16_scale(w.abs().mean(-1))


def binarize_fbi(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FBI-Linear init -> (S, col_scale fp16 (in,), col_shift fp16 (in,))."""
    w = w.detach().float()
    shift = w.mean(0).clamp(-65504.0, 65504.0).to(torch.float16)      # (in,)
    centred = w - shift.float()
    return signs(centred), _fp16_scale(centred.abs().mean(0)), shift


def scaffold_rows(S: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    return S.float() * row_scale.float().unsqueeze(-1)


def scaffold_fbi(S: torch.Tensor, col_scale: torch.Tensor, col_shift: torch.Tensor) -> torch.Tensor:
    return S.float() * col_scale.float() + col_shift.float()


# -- low-rank corrections ------------------------------------------------------------------

_LOWRANK = {"method": "exact"}
LOWRANK_METHODS = ("exact", "randomized")


@contextlib.contextmanager
def lowrank_method(method: str):
    """Within the block, "svd" corrections start from `method`: "exact" (subspace iteration to
    convergence, the default, for distillation) or "randomized" (torch.svd_lowrank with 2
    power iterations: milliseconds per matrix, for packing artifacts for size/speed work)."""
    if method not in LOWRANK_METHODS:
        raise DfplanError(f"low-rank method {method!r} is not one of {', '.join(LOWRANK_METHODS)}")
    old = _LOWRANK["method"]
    _LOWRANK["method"] = method
    try:
        yield
    finally:
        _LOWRANK["method"] = old


def _randomized_factors(r: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = min(rank + 8, *r.shape)                                        # oversampled sketch
    with torch.random.fork_rng(devices=[]):                            # seeded, global RNG untouched
        torch.manual_seed(0)
        U, S, V = torch.svd_lowrank(r, q=q, niter=2)                   # (m, q), (q,), (k, q)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, (V[:, :rank] * root).T


def lowrank_factors(residual: torch.Tensor, rank: int, init: str = "svd",
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float factors U (out, r), V (r, in) of the correction before quantisation."""
    out_f, in_f = residual.shape
    if not 0 < rank <= min(out_f, in_f):
        raise DfplanError(f"rank {rank} must be in 1..min(out, in) = {min(out_f, in_f)}")
    r = residual.detach().float()
    if init == "zero":
        v = (torch.randn(rank, in_f, generator=generator) / in_f ** 0.5).to(r.device)
        return torch.zeros(out_f, rank, device=r.device), v
    if init != "svd":
        raise DfplanError(f"low-rank init {init!r} is not one of svd, zero")
    if _LOWRANK["method"] == "randomized":
        return _randomized_factors(r, rank)
    # top-r right singular vectors from the small Gram matrix: exact for the leading
    # components and ~10x cheaper than a full SVD of an (8512, 2048) matrix
    transpose = out_f < in_f
    a = r.T if transpose else r                                        # (m, k), m >= k
    evals, evecs = _top_eigh((a.T @ a).double(), rank)                 # (r,), (k, r) descending
    sig = evals.clamp(min=0).sqrt()                                    # (r,)
    vk = evecs.float()
    uk = a @ vk                                                        # (m, r) = U_r * sig
    root = sig.float().sqrt()
    inv_root = torch.where(root > 0, 1.0 / root.clamp(min=1e-30), torch.zeros_like(root))
    left, right = uk * inv_root, vk * root                             # (m, r), (k, r)
    if transpose:                                                      # residual = left' @ right'^T swapped
        return right, left.T
    return left, right.T


def _orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of y's columns: Cholesky-QR (a few times cheaper than Householder QR
    on tall blocks, and exact enough in float64 since every iterate is re-orthonormalised);
    Householder QR if the block is numerically rank deficient."""
    chol, info = torch.linalg.cholesky_ex(y.T @ y)
    if int(info):
        return torch.linalg.qr(y)[0]
    return torch.linalg.solve_triangular(chol, y.T, upper=False).T


def _top_eigh(gram: torch.Tensor, rank: int, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading `rank` eigenpairs of a symmetric PSD (k, k) matrix, largest first.

    Small problems use a full eigh; large ones block subspace iteration with an oversampled
    block (2r + 48) and a fixed seed: on a white-noise (8512, 2048) residual, the worst case
    (flat spectrum), it captures 99.9% of the optimal rank-16 energy in ~2 s where a full
    (2048, 2048) eigh takes 10-20 s on 2 cores; real weights' decaying spectra converge faster.
    """
    k = gram.shape[0]
    p = min(k, 2 * rank + 48)
    if k <= 512 or 2 * p >= k:
        evals, evecs = torch.linalg.eigh(gram)                         # ascending
        return evals[-rank:].flip(-1), evecs[:, -rank:].flip(-1)
    g = torch.Generator().manual_seed(0)
    q = _orthonormalize(gram @ torch.randn(k, p, generator=g, dtype=gram.dtype))
    for _ in range(iters):
        q = _orthonormalize(gram @ q)                                  # (k, p)
    evals, small = torch.linalg.eigh(q.T @ gram @ q)                   # Rayleigh-Ritz (p, p)
    return evals[-rank:].flip(-1), (q @ small)[:, -rank:].flip(-1)


def quantize_rows_sym(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric absmax quantisation -> (int16 values, fp16 scales (rows,))."""
    q = quantize_intn(x, bits, 0, True, clip=False)
    return q.q, q.scale


def lowrank_init(residual: torch.Tensor, rank: int, init: str = "svd", bits: int = 8,
                 generator: torch.Generator | None = None) -> LowRank:
    """Quantised correction factors for a residual W - scaffold."""
    u, v = lowrank_factors(residual, rank, init, generator)
    uq, us = quantize_rows_sym(u, bits)
    vq, vs = quantize_rows_sym(v, bits)
    return LowRank(uq, us, vq, vs)


def lowrank_dequant(lr: LowRank) -> tuple[torch.Tensor, torch.Tensor]:
    return (lr.u.float() * lr.u_scale.float().unsqueeze(-1),
            lr.v.float() * lr.v_scale.float().unsqueeze(-1))


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio 10 log10(|w|^2 / |w - w_hat|^2)."""
    w = w.detach().double()
    noise = (w - w_hat.detach().double()).square().sum()
    return float(10 * torch.log10(w.square().sum() / noise.clamp(min=1e-300)))



# -- whole specs: float weight <-> the stored payload ---------------------------------------

def encode_weight(weight: torch.Tensor, spec, generator: torch.Generator | None = None) -> dict:
    """(out, in) float weight -> {buffer name: tensor}, exactly the tensors spec.payload lists."""
    payload = spec.payload(tuple(weight.shape))                        # validates the shape
    w = weight.detach()
    if isinstance(spec, Keep):
        out = {"weight": w.to(getattr(torch, spec.torch_dtype_name)).contiguous()}
    elif isinstance(spec, IntN):
        q = quantize_intn(w, spec.bits, spec.group, spec.symmetric)
        out = {"qweight": pack_intn(q.q, spec.bits, spec.symmetric), "scale": q.scale}
        if q.zero is not None:
            out["zero"] = q.zero
    elif isinstance(spec, Binary):
        if spec.scale == "row":
            S, rs = binarize_rows(w)
            out = {"bits": pack_signs(S), "row_scale": rs}
            scaffold = scaffold_rows(S, rs)
        else:
            S, cs, sh = binarize_fbi(w)
            out = {"bits": pack_signs(S), "col_scale": cs, "col_shift": sh}
            scaffold = scaffold_fbi(S, cs, sh)
        if spec.rank:
            lr = lowrank_init(w.float() - scaffold, spec.rank, spec.init, spec.rank_bits, generator)
            out.update(u=pack_intn(lr.u, spec.rank_bits, True), u_scale=lr.u_scale,
                       v=pack_intn(lr.v, spec.rank_bits, True), v_scale=lr.v_scale)
    else:
        raise TypeError(f"not a layer spec: {spec!r}")
    _check_payload(spec, payload, out)
    return out


def _check_payload(spec, payload, buffers: dict) -> None:
    want = {t.name: t for t in payload}
    if set(want) != set(buffers):
        raise DfplanError(f"{spec}: tensors {sorted(buffers)} do not match the format's {sorted(want)}")
    for name, t in want.items():
        b = buffers[name]
        if tuple(b.shape) != t.shape or str(b.dtype).removeprefix("torch.") != t.dtype:
            raise DfplanError(f"{spec}: tensor {name!r} is {str(b.dtype)} {tuple(b.shape)}, "
                              f"the format stores {t.dtype} {t.shape}")


def decode_weight(spec, shape, buffers: dict, dtype=torch.float32) -> torch.Tensor:
    """The stored payload -> the (out, in) weight it represents (reference dequantisation)."""
    out_f, in_f = shape
    if isinstance(spec, Keep):
        return buffers["weight"].to(dtype)
    if isinstance(spec, IntN):
        q = unpack_intn(buffers["qweight"], in_f, spec.bits, spec.symmetric)
        return dequantize_intn(q, buffers["scale"], buffers.get("zero"), dtype=dtype)
    if isinstance(spec, Binary):
        S = unpack_signs(buffers["bits"], in_f, torch.float32)
        if spec.scale == "row":
            w = scaffold_rows(S, buffers["row_scale"])
        else:
            w = scaffold_fbi(S, buffers["col_scale"], buffers["col_shift"])
        if spec.rank:
            u, v = correction_factors(spec, in_f, buffers)
            w = w + u @ v
        return w.to(dtype)
    raise TypeError(f"not a layer spec: {spec!r}")


def correction_factors(spec, in_f: int, buffers: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantised U (out, r), V (r, in) of a Binary spec's correction."""
    lr = LowRank(unpack_intn(buffers["u"], spec.rank, spec.rank_bits, True), buffers["u_scale"],
                 unpack_intn(buffers["v"], in_f, spec.rank_bits, True), buffers["v_scale"])
    return lowrank_dequant(lr)


def fake_quant(weight: torch.Tensor, spec, generator: torch.Generator | None = None) -> torch.Tensor:
    """What the packed checkpoint will compute for this weight: decode(encode(weight))."""
    return decode_weight(spec, tuple(weight.shape), encode_weight(weight, spec, generator), dtype=weight.dtype)


def fake_quant_many(weight: torch.Tensor, specs, generators=None) -> list[torch.Tensor]:
    """fake_quant for several specs of one weight, sharing the expensive parts: one scaffold
    per scale kind and one SVD-init factorisation at the largest rank, sliced per rank (the
    leading singular directions do not depend on how many are kept). Equal to calling
    fake_quant per spec when min(out, in) <= 512 (exact eigendecomposition); above that the
    subspace iteration is run once at the largest rank, which is at least as accurate.
    generators: one per spec (or None), used by zero-init corrections only.
    """
    specs = list(specs)
    generators = list(generators) if generators is not None else [None] * len(specs)
    w = weight.detach().float()
    scaffolds: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    max_rank: dict[str, int] = {}
    for s in specs:
        if isinstance(s, Binary) and s.rank and s.init == "svd":
            max_rank[s.scale] = max(max_rank.get(s.scale, 0), s.rank)
    out = []
    for s, g in zip(specs, generators):
        if not isinstance(s, Binary) or (s.rank and s.init != "svd"):
            out.append(fake_quant(weight, s, generator=g))
            continue
        s.validate(tuple(w.shape))
        if s.scale not in scaffolds:
            parts = binarize_rows(w) if s.scale == "row" else binarize_fbi(w)
            scaffolds[s.scale] = scaffold_rows(*parts) if s.scale == "row" else scaffold_fbi(*parts)
        w_hat = scaffolds[s.scale]
        if s.rank:
            if s.scale not in factors:
                factors[s.scale] = lowrank_factors(w - w_hat, max_rank[s.scale], "svd")
            u, v = factors[s.scale]
            uq, us = quantize_rows_sym(u[:, :s.rank].contiguous(), s.rank_bits)
            vq, vs = quantize_rows_sym(v[:s.rank].contiguous(), s.rank_bits)
            du, dv = lowrank_dequant(LowRank(uq, us, vq, vs))
            w_hat = w_hat + du @ dv
        out.append(w_hat.to(weight.dtype))
    return out
