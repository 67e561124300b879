"""Triton kernels against the references under TRITON_INTERPRET=1 (CPU), small shapes only.

The interpreter has to be switched on before triton is first imported, so these cases run in
a fresh process started by tests/test_kernels_triton.py (DFPLAN_TRITON_CASES=1); in an
ordinary session this module skips itself.
"""
import os

import pytest

if os.environ.get("DFPLAN_TRITON_CASES") != "1" or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run in a fresh interpreter process by test_kernels_triton.py",
                allow_module_level=True)

import torch  # noqa: E402

pytest.importorskip("triton")

from dfplan.kernels import binary_linear_ref, int8_linear_ref, mamba2_step_ref  # noqa: E402
from dfplan.kernels import triton_linear as tlin  # noqa: E402
from dfplan.kernels import triton_step as tstep  # noqa: E402
from dfplan.kernels.packing import pack_signs  # noqa: E402


@pytest.fixture(scope="module")
def interp():
    assert tlin.INTERPRETED and tstep.INTERPRETED
    return tlin, tstep


def gen(seed):
    return torch.Generator().manual_seed(seed)


def case(seed, M, N, K, rank=0, fbi=False, bias=False, dtype=torch.float32):
    g = gen(seed)
    W = torch.randn(N, K, generator=g)
    x = torch.randn(M, K, generator=g).to(dtype)
    kw = {}
    rs = None if fbi else (W.abs().mean(1) + 0.1).half()
    if fbi:
        kw.update(col_scale=(torch.rand(K, generator=g) + 0.5).half(),
                  col_shift=(torch.randn(K, generator=g) * 0.1).half())
    if rank:
        kw.update(u=torch.randint(-127, 128, (N, rank), generator=g, dtype=torch.int8),
                  u_scale=(torch.rand(N, generator=g) * 0.01).half(),
                  v=torch.randint(-127, 128, (rank, K), generator=g, dtype=torch.int8),
                  v_scale=(torch.rand(rank, generator=g) * 0.01).half())
    if bias:
        kw["bias"] = torch.randn(N, generator=g)
    return x, pack_signs(W), rs, kw


def close(y, ref, rel):
    return float((y.float() - ref.float()).abs().max()) <= rel * float(ref.float().abs().max()) + 1e-6


@pytest.mark.parametrize("path,M,N,K", [("gemv", 1, 13, 77), ("gemv", 3, 37, 203),
                                        ("gemm", 2, 19, 130), ("gemm", 9, 20, 65)])
@pytest.mark.parametrize("variant", ["row+r5+bias", "fbi+r3"])
def test_binary_triton_matches_reference(interp, path, M, N, K, variant):
    tlin = interp[0]
    fbi = variant.startswith("fbi")
    x, bits, rs, kw = case(M * N + K, M, N, K, rank=3 if fbi else 5, fbi=fbi, bias=not fbi)
    ref = binary_linear_ref(x, bits, rs, K, **kw)
    y = torch.full((M, N), float("nan"))
    tlin.binary_linear_triton(x, bits, rs, K, out=y, force=path, **kw)
    assert not y.isnan().any()
    assert close(y, ref, 1e-5)


@pytest.mark.parametrize("path", ["gemv", "gemm"])
def test_half_precision_activations(interp, path):
    tlin = interp[0]
    x, bits, rs, kw = case(5, 4, 24, 100, rank=2, dtype=torch.float16)
    y = tlin.binary_linear_triton(x, bits, rs, 100, force=path, **kw)
    assert y.dtype == torch.float16
    assert close(y, binary_linear_ref(x.float(), bits, rs, 100, **kw), 2e-3)


@pytest.mark.parametrize("path,M,N,K", [("gemv", 1, 11, 70), ("gemm", 5, 33, 90)])
def test_int8_triton_matches_reference(interp, path, M, N, K):
    tlin = interp[0]
    g = gen(M + K)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    s = torch.rand(N, generator=g).half()
    b = torch.randn(N, generator=g)
    x = torch.randn(M, K, generator=g)
    y = torch.full((M, N), float("nan"))
    tlin.int8_linear_triton(x, q, s, b, out=y, force=path)
    assert close(y, int8_linear_ref(x, q, s, b), 1e-5)


def test_dispatch_can_force_triton_under_the_interpreter(interp, monkeypatch):
    from dfplan.kernels import binary_linear
    monkeypatch.setenv("DFPLAN_KERNELS", "triton")
    x, bits, rs, kw = case(9, 2, 9, 40, rank=2)
    y = binary_linear(x.reshape(2, 1, 40), bits, rs, 40, **kw)
    assert y.shape == (2, 1, 9)
    assert close(y.reshape(2, 9), binary_linear_ref(x, bits, rs, 40, **kw), 1e-5)


@pytest.mark.parametrize("ngroups,d_has_hdim", [(1, False), (2, True)])
def test_mamba2_step_triton_matches_reference(interp, ngroups, d_has_hdim):
    tstep = interp[1]
    g = gen(11)
    Bsz, H, P, N, d_conv = 2, 4, 8, 16, 4
    d_inner = H * P
    conv_dim = d_inner + 2 * ngroups * N
    zxbcdt = torch.randn(Bsz, d_inner + conv_dim + H, generator=g)
    conv = torch.randn(Bsz, conv_dim, d_conv, generator=g)
    ssm = torch.randn(Bsz, H, P, N, generator=g)
    w = torch.randn(conv_dim, 1, d_conv, generator=g) * 0.5
    cb = torch.randn(conv_dim, generator=g)
    dt_bias, A_log = torch.randn(H, generator=g), torch.rand(H, generator=g) * 2
    D = torch.randn(d_inner if d_has_hdim else H, generator=g)
    nw = torch.randn(d_inner, generator=g)
    args = (w, cb, dt_bias, A_log, D, nw, 1e-5, ngroups, P, N)
    conv_r, ssm_r = conv.clone(), ssm.clone()
    ref = mamba2_step_ref(zxbcdt, conv_r, ssm_r, *args)
    y = tstep.mamba2_step_triton(zxbcdt, conv, ssm, *args)
    assert close(y, ref, 1e-5)
    assert torch.allclose(conv, conv_r) and close(ssm, ssm_r, 1e-5)
