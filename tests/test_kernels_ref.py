"""Reference twins agree with the formats' own maths and with the model's decode step."""
import pytest
import torch
import torch.nn.functional as F

from dfplan.formats import quant
from dfplan.formats.modules import BinaryLinear, IntNEmbedding, IntNLinear
from dfplan.formats.specs import parse_spec
from dfplan.kernels import (
    binary_linear_ref,
    int8_linear_ref,
    intn_embedding_ref,
    intn_linear_ref,
    mamba2_step_ref,
    quantize_activations_ref,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ["bin", "bin+r4", "fbi", "fbi+r8"])
def test_binary_ref_equals_the_module_weight(name):
    w = torch.randn(30, 75, generator=gen(0))
    b = torch.randn(30, generator=gen(1))
    m = BinaryLinear.from_float(w, parse_spec(name), bias=b)
    x = torch.randn(4, 75, generator=gen(2))
    fbi = m.spec.scale == "fbi"
    r = m.spec.rank > 0
    y = binary_linear_ref(x, m.bits, None if fbi else m.row_scale, 75,
                          col_scale=m.col_scale if fbi else None,
                          col_shift=m.col_shift if fbi else None,
                          u=m.u if r else None, u_scale=m.u_scale if r else None,
                          v=m.v if r else None, v_scale=m.v_scale if r else None, bias=m.bias)
    assert torch.allclose(y, F.linear(x, m.dequantize(), b), atol=1e-5)


def test_quantized_activations_are_int8_per_token():
    x = torch.randn(6, 100, generator=gen(3)) * torch.arange(1, 7)[:, None]
    xq, sx = quantize_activations_ref(x)
    assert xq.abs().max() <= 127 and torch.equal(xq, xq.round())
    assert torch.equal(xq.abs().amax(1), torch.full((6,), 127.0))
    assert (x - xq * sx[:, None]).abs().max() <= (sx.max() / 2) * 1.0001


def test_int8_and_intn_refs_match_the_modules():
    w = torch.randn(40, 64, generator=gen(4))
    x = torch.randn(3, 64, generator=gen(5))
    m = IntNLinear.from_float(w, parse_spec("int8"))
    assert torch.allclose(int8_linear_ref(x, m.qweight, m.scale), m.forward_reference(x), atol=1e-5)
    for name in ("int4", "int4g16", "int3a", "int2g32a"):
        spec = parse_spec(name)
        m = IntNLinear.from_float(w, spec)
        q = quant.unpack_intn(m.qweight, 64, spec.bits, spec.symmetric)
        zero = None if spec.symmetric else m.zero
        y = intn_linear_ref(x, q, m.scale, group=spec.group, zero=zero)
        assert torch.allclose(y, m.forward_reference(x), atol=1e-5), name
    e = IntNEmbedding.from_float(torch.randn(50, 16, generator=gen(6)), parse_spec("int4a"))
    ids = torch.randint(0, 50, (2, 9), generator=gen(7))
    q = quant.unpack_intn(e.qweight, 16, 4, False)
    assert torch.allclose(intn_embedding_ref(ids, q, e.scale, zero=e.zero), e(ids), atol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"ngroups": 2}, {"D_has_hdim": True}])
def test_step_ref_equals_the_model_parallel_forward(tiny_cfg, overrides):
    """Stepping the reference twin token by token reproduces the mixer's chunked forward
    (output before out_proj, and the final conv and SSM states)."""
    from dfplan.model import build_model
    cfg = tiny_cfg.replace(**overrides)
    model = build_model(cfg, seed=0).eval()
    mixer = model.backbone.layers[0].mixer
    g = gen(8)
    with torch.no_grad():  # random, non-trivial parameters for everything the step touches
        for p in (mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.D, mixer.norm.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    b, L = 3, 21                                   # 21 crosses the tiny config's 16-token chunks
    u = torch.randn(b, L, cfg.d_model, generator=g)
    captured, cache = {}, {}
    hook = mixer.out_proj.register_forward_hook(lambda mod, inp, out: captured.update(y=inp[0]))
    with torch.no_grad():
        mixer(u, cache)
        conv = torch.zeros(b, cfg.conv_dim, cfg.d_conv)
        ssm = torch.zeros(b, cfg.nheads, cfg.headdim, cfg.d_state)
        ys = [mamba2_step_ref(mixer.in_proj(u[:, t]), conv, ssm, mixer.conv1d.weight, mixer.conv1d.bias,
                              mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, mixer.norm.eps,
                              cfg.ngroups, cfg.headdim, cfg.d_state) for t in range(L)]
    hook.remove()
    assert torch.allclose(torch.stack(ys, 1), captured["y"], atol=1e-5, rtol=1e-4)
    assert torch.allclose(conv, cache["conv"], atol=1e-6)
    assert torch.allclose(ssm, cache["ssm"], atol=1e-5, rtol=1e-4)
