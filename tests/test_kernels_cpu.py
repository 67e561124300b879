"""C++ CPU kernels against their pure-torch twins, on every instruction-set path this CPU has."""
import shutil

import pytest
import torch

from dfplan.kernels import binary_linear_ref, cpu, int8_linear_ref, packing, quantize_activations_ref
from dfplan.kernels.packing import (
    ROW_BLOCKS,
    from_row_blocks,
    from_row_blocks_,
    pack_signs,
    to_row_blocks,
    to_row_blocks_,
)


def _ext_or_skip():
    if cpu.extension() is None:
        if shutil.which("c++") or shutil.which("g++"):
            pytest.fail(f"a C++ compiler exists but the CPU kernels did not build: {cpu.build_error()}")
        pytest.skip(f"no C++ compiler: {cpu.build_error()}")
    return cpu.extension()


@pytest.fixture(scope="module")
def isas():
    _ext_or_skip()
    return list(range(cpu.best_isa() + 1))


def gen(seed):
    return torch.Generator().manual_seed(seed)


def poisoned(tokens, out_f):
    return torch.full((tokens, out_f), float("nan"))


def binary_case(seed, tokens, out_f, in_f, fbi=False, rank=0, bias=False):
    g = gen(seed)
    W = torch.randn(out_f, in_f, generator=g)
    args = dict(x=torch.randn(tokens, in_f, generator=g) * 3, bits=pack_signs(W), in_features=in_f,
                row_scale=None if fbi else (W.abs().mean(1) + 0.1).half())
    kw = {}
    if fbi:
        kw["col_scale"] = (torch.rand(in_f, generator=g) + 0.2).half()
        kw["col_shift"] = (torch.randn(in_f, generator=g) * 0.1).half()
    if rank:
        kw["u"] = torch.randint(-127, 128, (out_f, rank), generator=g, dtype=torch.int8)
        kw["v"] = torch.randint(-127, 128, (rank, in_f), generator=g, dtype=torch.int8)
        kw["u_scale"] = (torch.rand(out_f, generator=g) * 0.01).half()
        kw["v_scale"] = (torch.rand(rank, generator=g) * 0.01).half()
    if bias:
        kw["bias"] = torch.randn(out_f, generator=g)
    return args, kw


def close(y, ref, rel=1e-5):
    tol = rel * float(ref.abs().max()) + 1e-6
    return float((y - ref).abs().max()) <= tol


# awkward shapes: in not a multiple of 8 / 64 / 256, odd out, batch 1..17 (token tiles of 8);
# (1, 40, 1100) and (2, 9, 1000): full 8-byte groups left over after the unrolled
# multi-accumulator loop of the small-batch AVX-512 path, then a partial one
SHAPES = [(1, 1, 1), (1, 7, 9), (2, 33, 63), (3, 5, 64), (5, 17, 65), (8, 129, 200),
          (9, 64, 257), (16, 31, 512), (17, 70, 515), (1, 300, 2048), (4, 65, 2311),
          (1, 40, 1100), (2, 9, 1000)]


@pytest.mark.parametrize("tokens,out_f,in_f", SHAPES)
def test_binary_matches_reference_on_every_path(isas, tokens, out_f, in_f):
    args, kw = binary_case(tokens * 1000 + in_f, tokens, out_f, in_f)
    ref = binary_linear_ref(args["x"], args["bits"], args["row_scale"], in_f, act_quant=True)
    for isa in isas:
        y = poisoned(tokens, out_f)
        cpu.binary_linear_cpu(args["x"], args["bits"], args["row_scale"], in_f, isa=isa, out=y)
        assert not y.isnan().any(), f"isa {isa} left outputs unwritten"
        assert close(y, ref), f"isa {isa}: max err {(y - ref).abs().max()}"


@pytest.mark.parametrize("fbi,rank,bias", [(False, 5, True), (True, 0, False), (True, 16, True),
                                           (False, 1, False)])
@pytest.mark.parametrize("tokens,out_f,in_f", [(1, 37, 203), (11, 66, 520)])
def test_binary_fbi_correction_bias(isas, fbi, rank, bias, tokens, out_f, in_f):
    args, kw = binary_case(7 + rank + tokens, tokens, out_f, in_f, fbi=fbi, rank=rank, bias=bias)
    ref = binary_linear_ref(args["x"], args["bits"], args["row_scale"], in_f, act_quant=True, **kw)
    for isa in isas:
        y = poisoned(tokens, out_f)
        cpu.binary_linear_cpu(args["x"], args["bits"], args["row_scale"], in_f, isa=isa, out=y, **kw)
        assert close(y, ref), f"isa {isa}: max err {(y - ref).abs().max()}"


@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("tokens,out_f,in_f", [(1, 37, 203), (3, 70, 515), (1, 300, 2048)])
def test_fp16_row_vectors_read_as_stored(isas, tokens, out_f, in_f, rank):
    """row_scale / u_scale / bias in fp16 (as BinaryLinear stores them) are read through F16C
    by the AVX2 epilogue, not converted per call: same bits as their fp32 copies; and without
    a correction every path equals the portable one bit for bit (the runtime self-check)."""
    args, kw = binary_case(out_f + rank, tokens, out_f, in_f, rank=rank, bias=True)
    kw["bias"] = kw["bias"].half()
    x, bits, rs = args["x"], args["bits"], args["row_scale"]
    f32 = {k: v.float() if v.dtype == torch.float16 else v for k, v in kw.items()}
    portable = cpu.binary_linear_cpu(x, bits, rs, in_f, isa=0, **kw)
    for isa in isas:
        a = cpu.binary_linear_cpu(x, bits, rs, in_f, isa=isa, **kw)
        b = cpu.binary_linear_cpu(x, bits, rs.float(), in_f, isa=isa, **f32)
        assert torch.equal(a, b), f"isa {isa}: max diff {(a - b).abs().max()}"
        if rank == 0:
            assert torch.equal(a, portable), f"isa {isa}: max diff {(a - portable).abs().max()}"
        else:
            assert close(a, portable)


@pytest.mark.parametrize("in_cpp", [True, False])
@pytest.mark.parametrize("out_f,nb", [(1, 1), (63, 5), (64, 3), (130, 7), (200, 82)])
def test_row_blocks_order_and_round_trip(out_f, nb, in_cpp, monkeypatch):
    if not in_cpp:     # the pure-torch reorder (no C++ extension)
        monkeypatch.setattr(packing, "_reorder_in_cpp", lambda *a: False)
    elif cpu.extension() is None:
        pytest.skip("no C++ extension")
    bits = torch.randint(0, 256, (out_f, nb), dtype=torch.uint8, generator=gen(out_f))
    blocks = to_row_blocks(bits)
    assert blocks.shape == bits.shape and torch.equal(from_row_blocks(blocks), bits)
    assert torch.equal(blocks, packing.reorder_torch_(bits.clone(), True))    # C++ vs its twin
    inplace = bits.clone()
    ptr = inplace.data_ptr()
    assert torch.equal(to_row_blocks_(inplace), blocks) and inplace.data_ptr() == ptr
    assert torch.equal(from_row_blocks_(inplace), bits) and inplace.data_ptr() == ptr
    flat = blocks.view(-1)
    for o in {0, out_f // 2, out_f - 1}:       # the offset packing.py documents
        o0 = o // 64 * 64
        h = min(64, out_f - o0)
        for j in {0, nb // 2, nb - 1}:
            assert flat[o0 * nb + j * h + (o - o0)] == bits[o, j]


# one token: the lookup kernel on full 64-row blocks, rows rebuilt for the last partial one;
# several tokens: rows rebuilt per block. in 8192: 1024 column bytes, many int16 widenings
@pytest.mark.parametrize("tokens,out_f,in_f", [(1, 64, 64), (1, 200, 650), (1, 128, 2311),
                                               (1, 7, 9), (1, 300, 2048), (1, 64, 8192),
                                               (3, 200, 650), (9, 130, 257)])
@pytest.mark.parametrize("fbi,rank,bias", [(False, 0, False), (True, 16, True), (False, 5, True)])
def test_row_blocks_layout_equals_rows(isas, tokens, out_f, in_f, fbi, rank, bias):
    args, kw = binary_case(out_f + in_f + rank, tokens, out_f, in_f, fbi=fbi, rank=rank, bias=bias)
    x, rs = args["x"], args["row_scale"]
    blocks = to_row_blocks(args["bits"])
    ref = binary_linear_ref(x, args["bits"], rs, in_f, act_quant=True, **kw)
    for isa in isas:
        want = cpu.binary_linear_cpu(x, args["bits"], rs, in_f, isa=isa, **kw)
        y = poisoned(tokens, out_f)
        cpu.binary_linear_cpu(x, blocks, rs, in_f, isa=isa, out=y, layout=ROW_BLOCKS, **kw)
        assert torch.equal(y, want), f"isa {isa}: max diff {(y - want).abs().max()}"
        assert close(y, ref), f"isa {isa}: max err {(y - ref).abs().max()}"


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_row_blocks_lookup_sums_cannot_overflow(isas, sign):
    # every bit set and every activation quantized to +-127 is the largest sum the int16
    # lanes of the lookup kernel see before they are widened (every 32 column bytes)
    in_f = 8192
    bits = torch.full((128, in_f // 8), 255, dtype=torch.uint8)
    x = torch.full((1, in_f), 3.0 * sign)
    rs = torch.ones(128)
    ref = binary_linear_ref(x, bits, rs, in_f, act_quant=True)
    assert float(ref[0, 0]) == pytest.approx(3.0 * sign * in_f, rel=1e-6)
    for isa in isas:
        y = cpu.binary_linear_cpu(x, to_row_blocks(bits), rs, in_f, isa=isa, layout=ROW_BLOCKS)
        assert close(y, ref), f"isa {isa}: {y[0, :3]} vs {ref[0, :3]}"


def test_padding_bits_are_ignored(isas):
    # the layout says padding bits are 0, but a consumer must not depend on it
    args, _ = binary_case(3, 4, 9, 13)
    dirty = args["bits"].clone()
    dirty[:, -1] |= 0b11100000  # bits 13..15 of a 13-column row
    for isa in isas:
        a = cpu.binary_linear_cpu(args["x"], args["bits"], args["row_scale"], 13, isa=isa)
        b = cpu.binary_linear_cpu(args["x"], dirty, args["row_scale"], 13, isa=isa)
        assert torch.equal(a, b)


def test_activation_rounding_ties_match_reference(isas):
    # amax 127 -> scale 1: every x.5 is a tie, rounded half to even like torch.round
    vals = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, -126.5, 0.49, -3.5])
    x = torch.cat([vals, vals.flip(0), vals[:9]]).reshape(1, -1)  # 33 values: vector + tail code
    xq, sx = quantize_activations_ref(x)
    assert float(sx) == 1.0 and xq[0, 1:4].tolist() == [0.0, 2.0, 2.0]
    n = x.shape[1]
    eye = torch.eye(n, dtype=torch.int8)
    for isa in isas:
        y = cpu.int8_linear_cpu(x, eye, torch.ones(n), isa=isa)
        assert torch.equal(y, xq), f"isa {isa} rounds differently"


def test_zero_activations_give_bias(isas):
    args, kw = binary_case(5, 3, 10, 40, rank=2, bias=True)
    x = torch.zeros(3, 40)
    for isa in isas:
        y = cpu.binary_linear_cpu(x, args["bits"], args["row_scale"], 40, isa=isa, **kw)
        assert torch.allclose(y, kw["bias"].expand(3, -1), atol=1e-6)


def int8_case(seed, tokens, out_f, in_f, bias):
    g = gen(seed)
    q = torch.randint(-128, 128, (out_f, in_f), generator=g, dtype=torch.int8)  # -128 included
    s = (torch.rand(out_f, generator=g) * 0.02).half()
    b = torch.randn(out_f, generator=g) if bias else None
    return torch.randn(tokens, in_f, generator=g), q, s, b


@pytest.mark.parametrize("tokens,out_f,in_f", SHAPES)
def test_int8_matches_reference_on_every_path(isas, tokens, out_f, in_f):
    x, q, s, b = int8_case(tokens + 31 * in_f, tokens, out_f, in_f, bias=tokens % 2 == 0)
    ref = int8_linear_ref(x, q, s, b, act_quant=True)
    for isa in isas:
        y = poisoned(tokens, out_f)
        cpu.int8_linear_cpu(x, q, s, b, isa=isa, out=y)
        assert not y.isnan().any(), f"isa {isa} left outputs unwritten"
        assert close(y, ref), f"isa {isa}: max err {(y - ref).abs().max()}"


def test_activation_quantization_error_is_bounded():
    # the kernels quantize x to int8 per token; bound the gap to the exact float maths
    for seed, (tokens, out_f, in_f) in enumerate([(4, 64, 512), (3, 50, 2048), (2, 33, 77)]):
        args, kw = binary_case(seed, tokens, out_f, in_f, rank=4, bias=True)
        x, bits, rs = args["x"], args["bits"], args["row_scale"]
        yq = binary_linear_ref(x, bits, rs, in_f, act_quant=True, **kw)
        ye = binary_linear_ref(x, bits, rs, in_f, **kw)
        # hard bound: |S . (x - sx xq)| <= sum_i |x_i - sx xq_i| <= in * sx / 2
        sx = x.abs().amax(1) / 127
        bound = rs.float()[None, :] * (in_f * sx[:, None] / 2) + 1e-4 * ye.abs().max()
        assert ((yq - ye).abs() <= bound).all()
        # typical gap for gaussian activations: well under 2 % of the output norm
        assert float((yq - ye).norm() / ye.norm()) < 0.02
        xi, q, s, b = int8_case(seed, tokens, out_f, in_f, bias=True)
        gap = int8_linear_ref(xi, q, s, b, act_quant=True) - int8_linear_ref(xi, q, s, b)
        assert float(gap.norm() / int8_linear_ref(xi, q, s, b).norm()) < 0.02


@pytest.mark.parametrize("ngroups,d_per_channel,gate_first,conv_bias",
                         [(1, False, False, True), (2, True, False, False), (2, False, True, True)])
def test_fused_step_matches_reference(isas, ngroups, d_per_channel, gate_first, conv_bias):
    from dfplan.kernels.step_ref import mamba2_step_ref
    g = gen(ngroups * 10 + d_per_channel)
    # N not a multiple of 8: vector tails; conv_dim (92 or 132) not a multiple of 8: the
    # 8-channel conv's scalar tail
    Bsz, H, P, N, d_conv = 3, 4, 13, 20, 4
    d_inner, conv_dim = H * P, H * P + 2 * ngroups * N
    zx = torch.randn(Bsz, d_inner + conv_dim + H, generator=g) * 2
    conv = torch.randn(Bsz, conv_dim, d_conv, generator=g)
    ssm = torch.randn(Bsz, H, P, N, generator=g)
    params = [torch.randn(conv_dim, 1, d_conv, generator=g),
              torch.randn(conv_dim, generator=g) if conv_bias else None,
              torch.randn(H, generator=g), torch.rand(H, generator=g) * 3,
              torch.randn(d_inner if d_per_channel else H, generator=g),
              torch.randn(d_inner, generator=g)]
    c_ref, s_ref = conv.clone(), ssm.clone()
    ref = mamba2_step_ref(zx, c_ref, s_ref, *params, 1e-5, ngroups, P, N,
                          norm_before_gate=gate_first)
    for isa in isas:
        c_k, s_k = conv.clone(), ssm.clone()
        y = cpu.mamba2_step_cpu(zx, c_k, s_k, *params, 1e-5, ngroups, P, N,
                                norm_before_gate=gate_first, use_avx2=isa >= 1)
        assert torch.equal(c_k, c_ref)
        assert close(s_k, s_ref, 1e-5) and close(y, ref, 2e-5), f"isa {isa}"


def test_kernels_run_on_torchs_threads():
    """at::parallel_for in the extension must spread over torch's threads (it silently ran
    on one when the library was built without -fopenmp)."""
    ext = _ext_or_skip()
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        if torch.get_num_threads() < 2:
            pytest.skip("this machine gives torch one thread")
        assert ext.parallel_width(64) == 2
        torch.set_num_threads(1)
        assert ext.parallel_width(64) == 1
    finally:
        torch.set_num_threads(n)
