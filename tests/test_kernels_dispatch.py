"""Kernel dispatch: backend choice, forcing via DFPLAN_KERNELS, and clear errors on bad input."""
import pytest
import torch

from dfplan.kernels import (
    binary_linear,
    binary_linear_ref,
    cpu,
    int8_embedding,
    int8_linear,
    int8_linear_ref,
    select_backend,
)
from dfplan.kernels.errors import KernelError
from dfplan.kernels.packing import ROW_BLOCKS, pack_signs, to_row_blocks


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def case():
    g = gen(0)
    W = torch.randn(21, 45, generator=g)
    return dict(x=torch.randn(2, 3, 45, generator=g), bits=pack_signs(W),
                row_scale=W.abs().mean(1).half(), in_features=45)


def call(c, **over):
    c = {**c, **over}
    return binary_linear(c["x"], c["bits"], c["row_scale"], c["in_features"],
                         **{k: v for k, v in c.items() if k not in ("x", "bits", "row_scale", "in_features")})


def test_forced_ref_is_the_exact_maths(case, monkeypatch):
    monkeypatch.setenv("DFPLAN_KERNELS", "ref")
    y = call(case)
    assert y.shape == (2, 3, 21)
    assert torch.equal(y, binary_linear_ref(case["x"], case["bits"], case["row_scale"], 45))


@pytest.mark.parametrize("mode", ["ref", "auto"])
def test_row_blocks_give_the_same_result_on_every_backend(case, monkeypatch, mode):
    # the row-block order is read by the C++ kernel; the other backends get rows back
    monkeypatch.setenv("DFPLAN_KERNELS", mode)
    x1 = case["x"][:1, :1]
    for x in (case["x"], x1):
        want = call({**case, "x": x})
        assert torch.equal(call({**case, "x": x}, bits=to_row_blocks(case["bits"]), layout=ROW_BLOCKS), want)
    with pytest.raises(KernelError, match="layout"):
        call(case, layout=2)


def test_auto_on_cpu_uses_the_cpp_kernel_when_built(case, monkeypatch):
    monkeypatch.delenv("DFPLAN_KERNELS", raising=False)
    want = "cpu" if cpu.available() else "ref"
    assert select_backend(case["x"]) == want
    y = call(case)
    ref = binary_linear_ref(case["x"], case["bits"], case["row_scale"], 45, act_quant=want == "cpu")
    assert torch.allclose(y, ref, atol=1e-5 * float(ref.abs().max()))


def test_bad_mode_and_impossible_forcing(case, monkeypatch):
    monkeypatch.setenv("DFPLAN_KERNELS", "fastest")
    with pytest.raises(KernelError, match="DFPLAN_KERNELS"):
        call(case)
    monkeypatch.setenv("DFPLAN_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelError, match="Triton"):
        call(case)
    monkeypatch.setenv("DFPLAN_KERNELS", "cpu")
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    with pytest.raises(KernelError, match="CPU kernels"):
        call(meta)


def test_half_precision_and_noncontiguous_activations(case):
    x = case["x"]
    y32 = call(case)
    for dt in (torch.float16, torch.bfloat16):
        y = call(case, x=x.to(dt))
        assert y.dtype == dt and y.shape == y32.shape
        assert torch.allclose(y.float(), y32, atol=0.05 * float(y32.abs().max()))
    xt = torch.randn(45, 6, generator=gen(1)).T  # (6, 45), not contiguous
    assert not xt.is_contiguous()
    assert torch.equal(call(case, x=xt), call(case, x=xt.contiguous()))


def test_gradients_flow_through_the_reference(case):
    x = case["x"].clone().requires_grad_(True)
    y = call(case, x=x)
    y.sum().backward()
    W = binary_linear_ref(torch.eye(45), case["bits"], case["row_scale"], 45).T  # (out, in)
    assert torch.allclose(x.grad, W.sum(0).expand_as(x), atol=1e-5)


BAD = [
    (dict(x=torch.ones(2, 45, dtype=torch.int64)), "x must be float"),
    (dict(x=torch.randn(2, 44)), r"shape \(\.\.\., 45\)"),
    (dict(in_features=0), "in_features"),
    (dict(bits=torch.zeros(21, 6, dtype=torch.int8)), "bits must be torch.uint8"),
    (dict(bits=torch.zeros(21, 5, dtype=torch.uint8)), "5 bytes per row but in_features=45 packs into 6"),
    (dict(bits=torch.zeros(21, 12, dtype=torch.uint8)[:, ::2]), "contiguous"),
    (dict(row_scale=torch.ones(20)), r"row_scale must have shape \(21,\)"),
    (dict(row_scale=torch.ones(21, dtype=torch.int32)), "row_scale must be float"),
    (dict(row_scale=None), "row_scale is required"),
    (dict(col_scale=torch.ones(45)), "together"),
    (dict(col_scale=torch.ones(45), col_shift=torch.zeros(45)), "not both"),
    (dict(u=torch.zeros(21, 4, dtype=torch.int8)), "all of u, u_scale, v, v_scale"),
    (dict(u=torch.zeros(21, 4, dtype=torch.int8), u_scale=torch.ones(21),
          v=torch.zeros(3, 45, dtype=torch.int8), v_scale=torch.ones(4)), r"v must have shape \(4, 45\)"),
    (dict(u=torch.zeros(21, 4), u_scale=torch.ones(21),
          v=torch.zeros(4, 45, dtype=torch.int8), v_scale=torch.ones(4)), "u must be torch.int8"),
    (dict(bias=torch.ones(21, device="meta")), "is on meta"),
]


@pytest.mark.parametrize("over,msg", BAD)
def test_bad_binary_inputs_raise_clear_errors(case, over, msg):
    with pytest.raises(KernelError, match=msg):
        call(case, **over)


def test_int8_linear_dispatch_and_errors(monkeypatch):
    g = gen(2)
    q = torch.randint(-127, 128, (19, 33), generator=g, dtype=torch.int8)
    s = torch.rand(19, generator=g).half()
    x = torch.randn(5, 33, generator=g)
    monkeypatch.setenv("DFPLAN_KERNELS", "ref")
    assert torch.equal(int8_linear(x, q, s), int8_linear_ref(x, q, s))
    monkeypatch.delenv("DFPLAN_KERNELS")
    y = int8_linear(x, q, s)
    ref = int8_linear_ref(x, q, s)
    assert torch.allclose(y, ref, atol=0.03 * float(ref.abs().max()))
    with pytest.raises(KernelError, match="qweight must be torch.int8"):
        int8_linear(x, q.to(torch.int16), s)
    with pytest.raises(KernelError, match=r"scale must have shape \(19,\)"):
        int8_linear(x, q, s[:5])
    with pytest.raises(KernelError, match="contiguous"):
        int8_linear(x, torch.zeros(33, 19, dtype=torch.int8).T, s)


def test_int8_embedding_gathers_scaled_rows():
    g = gen(3)
    q = torch.randint(-127, 128, (50, 8), generator=g, dtype=torch.int8)
    s = torch.rand(50, generator=g)
    ids = torch.randint(0, 50, (2, 5), generator=g)
    e = int8_embedding(ids, q, s)
    assert e.shape == (2, 5, 8)
    assert torch.equal(e, (q.float() * s[:, None])[ids])
    with pytest.raises(KernelError, match="token ids"):
        int8_embedding(torch.tensor([50]), q, s)


def test_mamba2_step_dispatch_checks_states():
    from dfplan.kernels import mamba2_step, mamba2_step_ref
    g = gen(4)
    Bsz, H, P, N, G = 2, 4, 8, 16, 1
    d_inner, conv_dim = H * P, H * P + 2 * G * N
    zx = torch.randn(Bsz, d_inner + conv_dim + H, generator=g)
    conv, ssm = torch.randn(Bsz, conv_dim, 4, generator=g), torch.randn(Bsz, H, P, N, generator=g)
    params = [torch.randn(conv_dim, 4, generator=g), torch.randn(conv_dim, generator=g),
              torch.randn(H, generator=g), torch.rand(H, generator=g), torch.randn(H, generator=g),
              torch.randn(d_inner, generator=g)]
    c2, s2 = conv.clone(), ssm.clone()
    y = mamba2_step(zx, conv, ssm, *params, 1e-5, G, P, N)  # fused C++ step when built
    assert torch.allclose(y, mamba2_step_ref(zx, c2, s2, *params, 1e-5, G, P, N), atol=1e-5)
    assert torch.equal(conv, c2) and torch.allclose(ssm, s2, atol=1e-5)
    with pytest.raises(KernelError, match="ssm_state must be a contiguous"):
        mamba2_step(zx, conv, ssm.transpose(2, 3), *params, 1e-5, G, P, N)
    with pytest.raises(KernelError, match="zxbcdt must have shape"):
        mamba2_step(zx[:, 1:], conv, ssm, *params, 1e-5, G, P, N)
    with pytest.raises(KernelError, match="ssm_state must have shape"):
        mamba2_step(zx, conv, ssm[:, :, :4].contiguous(), *params, 1e-5, G, P, N)
