"""Quantisation maths: bit order, zero signs, error monotone in bits and rank, SVD vs zero init."""
import pytest
import torch

from dfplan.formats import quant
from dfplan.formats.specs import Binary, IntN, parse_spec
from dfplan.kernels.packing import pack_signs, unpack_signs


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- bit order -------------------------------------------------------------------------------

def test_code_bit_order_lsb_first():
    # 4-bit: column 2m in the low nibble of byte m
    assert quant.pack_codes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    # 2-bit: four columns per byte from the low bits
    assert quant.pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3-bit: dense LSB-first stream, codes straddle bytes: 5=101, 3=011, 7=111 -> bits 1,0,1,1,1,0,1,1 | 1
    assert quant.pack_codes(torch.tensor([[5, 3, 7]]), 3).tolist() == [[0b11011101, 0b1]]
    # padding bits are zero
    assert quant.pack_codes(torch.tensor([[15]]), 4).tolist() == [[0x0F]]


def test_symmetric_codes_are_offset_binary_and_int8_is_twos_complement():
    q = torch.tensor([[-8, 7, 0, -1]], dtype=torch.int16)
    packed = quant.pack_intn(q, 4, True)
    assert packed.tolist() == [[(7 + 8) << 4 | (-8 + 8), (-1 + 8) << 4 | (0 + 8)]]
    q8 = torch.tensor([[-128, 127, -1]], dtype=torch.int16)
    s = quant.pack_intn(q8, 8, True)
    assert s.dtype == torch.int8 and s.view(torch.uint8).tolist() == [[0x80, 0x7F, 0xFF]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 37, 64])
def test_pack_unpack_round_trip(bits, n):
    c = torch.randint(0, 2 ** bits, (5, n), generator=gen(n))
    packed = quant.pack_codes(c, bits)
    assert packed.shape == (5, (n * bits + 7) // 8) and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_codes(packed, n, bits), c.to(torch.int16))
    q = c - 2 ** (bits - 1)
    assert torch.equal(quant.unpack_intn(quant.pack_intn(q, bits, True), n, bits, True), q.to(torch.int16))


def test_sign_of_exact_zeros_is_plus_one():
    w = torch.tensor([[0.0, -0.0, -1.0, 2.0, -3.0, 0.0, 1e-30, -1e-30, 0.0]])
    bits = pack_signs(w)
    # LSB first: columns 0, 1, 3, 5, 6 are +1 -> bits 0,1,3,5,6 of byte 0; column 8 -> bit 0 of byte 1
    assert bits.tolist() == [[0b01101011, 0b00000001]]
    S = unpack_signs(bits, 9)
    assert S.tolist() == [[1, 1, -1, 1, -1, 1, 1, -1, 1]]
    assert torch.equal(quant.signs(w), S)
    # a Binary row of zeros reconstructs to +scale (= 0 here) without NaNs
    w_hat = quant.fake_quant(torch.zeros(3, 16), Binary())
    assert torch.equal(w_hat, torch.zeros(3, 16))


# -- error behaviour -----------------------------------------------------------------------

@pytest.mark.parametrize("group,symmetric", [(0, True), (0, False), (32, True), (32, False)])
def test_sqnr_monotone_in_bits(group, symmetric):
    w = torch.randn(128, 256, generator=gen(1))
    db = [quant.sqnr_db(w, quant.fake_quant(w, IntN(b, group, symmetric))) for b in (2, 3, 4, 8)]
    assert db == sorted(db) and db[0] > 0 and db[-1] > 35, db


def test_clip_search_beats_absmax_at_low_bits():
    w = torch.randn(64, 512, generator=gen(2))
    for b in (2, 3, 4):
        clipped = quant.dequantize_intn(*quant.quantize_intn(w, b, clip=True))
        plain = quant.dequantize_intn(*quant.quantize_intn(w, b, clip=False))
        assert quant.sqnr_db(w, clipped) > quant.sqnr_db(w, plain)


def test_asymmetric_zero_is_exact_and_scales_fp16():
    w = torch.randn(16, 64, generator=gen(3)).abs() + 0.5      # all positive rows
    w[:, ::7] = 0.0
    q = quant.quantize_intn(w, 4, symmetric=False)
    assert q.scale.dtype == torch.float16 and q.zero.dtype == torch.uint8
    w_hat = quant.dequantize_intn(*q)
    assert torch.all(w_hat[:, ::7] == 0)
    # an all-zero row must not produce NaNs
    z = quant.fake_quant_intn(torch.zeros(2, 8), 3, symmetric=False)
    assert torch.equal(z, torch.zeros(2, 8))


@pytest.mark.parametrize("scale", ["row", "fbi"])
def test_sqnr_monotone_in_rank(scale):
    w = torch.randn(96, 160, generator=gen(4))
    db = [quant.sqnr_db(w, quant.fake_quant(w, Binary(scale, r))) for r in (0, 4, 8, 16, 32, 64)]
    assert db == sorted(db) and db[-1] > db[0] + 1.0, db


def test_svd_init_beats_zero_init_before_training():
    w = torch.randn(128, 96, generator=gen(5))
    for r in (8, 32):
        svd = quant.sqnr_db(w, quant.fake_quant(w, Binary("row", r, init="svd")))
        zero = quant.sqnr_db(w, quant.fake_quant(w, Binary("row", r, init="zero"), generator=gen(0)))
        scaffold = quant.sqnr_db(w, quant.fake_quant(w, Binary("row", 0)))
        assert svd > zero
        assert zero == pytest.approx(scaffold, abs=1e-9)       # U = 0: no correction yet


def test_binarize_row_scale_is_mean_abs():
    w = torch.randn(8, 40, generator=gen(6))
    S, rs = quant.binarize_rows(w)
    assert rs.dtype == torch.float16
    assert torch.allclose(rs.float(), w.abs().mean(1), rtol=1e-3)
    assert torch.equal(S, torch.where(w >= 0, 1.0, -1.0))


def test_fbi_init_and_its_advantage_on_column_offsets():
    w = torch.randn(64, 48, generator=gen(7)) * 0.1 + torch.linspace(-1, 1, 48)   # per-column offsets
    S, alpha, beta = quant.binarize_fbi(w)
    assert torch.allclose(beta.float(), w.mean(0), atol=1e-3)
    assert torch.allclose(alpha.float(), (w - beta.float()).abs().mean(0), rtol=1e-2, atol=1e-4)
    fbi = quant.sqnr_db(w, quant.fake_quant(w, Binary("fbi")))
    row = quant.sqnr_db(w, quant.fake_quant(w, Binary("row")))
    assert fbi > row + 3


def test_lowrank_svd_is_the_best_rank_r_approximation():
    r = torch.randn(80, 50, generator=gen(8))
    U, s, Vh = torch.linalg.svd(r, full_matrices=False)
    for A in (r, r.T.contiguous()):
        u, v = quant.lowrank_factors(A, 6)
        assert u.shape == (A.shape[0], 6) and v.shape == (6, A.shape[1])
        err = (A - u @ v).square().sum()
        assert err == pytest.approx(float(s[6:].square().sum()), rel=1e-4)


def test_lowrank_subspace_iteration_path_is_near_optimal():
    # k = 600 > 512 takes the subspace-iteration path; a decaying spectrum like real weights
    g = gen(9)
    a = torch.randn(700, 40, generator=g) @ torch.randn(40, 600, generator=g) + 0.3 * torch.randn(700, 600, generator=g)
    s = torch.linalg.svdvals(a)
    u, v = quant.lowrank_factors(a, 16)
    captured = a.square().sum() - (a - u @ v).square().sum()
    assert captured >= 0.999 * s[:16].square().sum()


def test_lowrank_rejects_bad_rank():
    from dfplan.errors import DfplanError
    with pytest.raises(DfplanError):
        quant.lowrank_factors(torch.randn(4, 6), 5)


def test_lowrank_init_quantized_factors():
    res = torch.randn(40, 30, generator=gen(10))
    lr = quant.lowrank_init(res, 8, "svd", bits=8)
    assert lr.u.shape == (40, 8) and lr.v.shape == (8, 30)
    assert lr.u_scale.dtype == torch.float16 and lr.v.abs().max() <= 127
    u, v = quant.lowrank_dequant(lr)
    fu, fv = quant.lowrank_factors(res, 8)
    assert torch.allclose(u @ v, fu @ fv, atol=0.05 * float((fu @ fv).abs().max()))


def test_decode_equals_fake_quant_and_matches_intn_maths():
    w = torch.randn(32, 64, generator=gen(11))
    spec = parse_spec("int4g16a")
    bufs = quant.encode_weight(w, spec)
    q = quant.quantize_intn(w, 4, 16, False)
    assert torch.equal(quant.decode_weight(spec, w.shape, bufs), quant.dequantize_intn(*q))
    assert torch.equal(quant.fake_quant(w, spec), quant.dequantize_intn(*q))


def test_fake_quant_many_shares_work_and_matches_fake_quant():
    from dfplan.formats.specs import DEFAULT_CANDIDATES
    w = torch.randn(150, 200, generator=gen(12))
    specs = [s for s in DEFAULT_CANDIDATES if getattr(s, "rank", 0) <= 150]
    specs += [Binary("fbi", 8), Binary("row", 8, 4), Binary("row", 8, init="zero")]
    many = quant.fake_quant_many(w, specs, [gen(i) for i in range(len(specs))])
    for i, (s, x) in enumerate(zip(specs, many)):
        assert torch.equal(x, quant.fake_quant(w, s, generator=gen(i))), s
    # subspace-iteration path (min dim > 512): same quality within a hair
    big = torch.randn(600, 520, generator=gen(13))
    specs = [Binary("row", 8), Binary("row", 32)]
    for s, x in zip(specs, quant.fake_quant_many(big, specs)):
        assert quant.sqnr_db(big, x) == pytest.approx(quant.sqnr_db(big, quant.fake_quant(big, s)), abs=0.02)
