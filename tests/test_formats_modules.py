"""Compressed modules (reference vs fast path, meta build + assign load) and apply_plan."""
import pytest
import torch
import torch.nn.functional as F

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats import quant
from dfplan.formats.apply import apply_plan, compressed_modules
from dfplan.formats.layouts import layout_plan
from dfplan.formats.modules import BinaryLinear, IntNEmbedding, IntNLinear
from dfplan.formats.plan import Plan
from dfplan.formats.specs import Binary, IntN, Keep, parse_spec
from dfplan.model import Embedding, build_model


def gen(seed):
    return torch.Generator().manual_seed(seed)


LINEAR_SPECS = ["bin", "bin+r8", "bin+r8i4", "bin+r4i3", "fbi", "fbi+r8", "int8", "int4", "int3g16",
                "int2a", "int8a"]


@pytest.mark.parametrize("name", LINEAR_SPECS)
def test_linear_module_matches_its_dequantized_weight(name):
    spec = parse_spec(name)
    w = torch.randn(48, 80, generator=gen(0))
    b = torch.randn(48, generator=gen(1))
    cls = BinaryLinear if isinstance(spec, Binary) else IntNLinear
    m = cls.from_float(w, spec, bias=b)
    W = m.dequantize()
    assert W.shape == (48, 80) and torch.equal(W, quant.fake_quant(w, spec))
    x = torch.randn(2, 5, 80, generator=gen(2))
    ref = m.forward_reference(x)
    assert torch.allclose(ref, F.linear(x, W, b), atol=1e-5)
    y = m(x)   # fast kernel when available (int8 activations), else the reference
    assert y.shape == (2, 5, 48) and y.dtype == x.dtype
    tol = 0.05 * float(ref.abs().max())
    assert torch.allclose(y, ref, atol=tol)


@pytest.mark.parametrize("name", LINEAR_SPECS)
def test_state_dict_is_the_payload_and_loads_on_meta(name):
    spec = parse_spec(name)
    w = torch.randn(24, 48, generator=gen(3))
    cls = BinaryLinear if isinstance(spec, Binary) else IntNLinear
    m = cls.from_float(w, spec)
    sd = m.state_dict()
    want = {t.name: (t.shape, t.dtype) for t in spec.payload((24, 48))}
    assert {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in sd.items()} == want
    empty = cls.empty(spec, (24, 48))
    assert all(b.is_meta for b in empty.buffers())
    empty.load_state_dict(sd, assign=True)
    x = torch.randn(3, 48, generator=gen(4))
    assert torch.equal(empty(x), m(x))


def test_embedding_module_gathers_rows_and_attends():
    w = torch.randn(100, 32, generator=gen(5))
    for name in ("int8", "int4", "int3a"):
        e = IntNEmbedding.from_float(w, parse_spec(name))
        W = e.dequantize()
        ids = torch.randint(0, 100, (2, 7), generator=gen(6))
        assert torch.equal(e.forward_reference(ids), W[ids])
        assert torch.allclose(e(ids), W[ids], atol=1e-6)
        h = torch.randn(2, 7, 32, generator=gen(7))
        ref = h @ W.T
        tol = 0.05 * float(ref.abs().max())
        assert torch.allclose(e.attend_reference(h), ref, atol=1e-5)
        assert torch.allclose(e.attend(h), ref, atol=tol)
    with pytest.raises(DfplanError):
        IntNEmbedding.from_float(w, parse_spec("int4g16"))
    with pytest.raises(DfplanError):
        BinaryLinear.from_float(w, IntN(8))


def test_rank_bits_below_8_unpack_for_the_kernel():
    w = torch.randn(32, 64, generator=gen(8))
    m = BinaryLinear.from_float(w, Binary("row", 8, 4))
    u, v = m._correction_int8()
    assert u.dtype == torch.int8 and u.shape == (32, 8) and v.shape == (8, 64)
    assert int(u.abs().max()) <= 8
    U, V = quant.correction_factors(m.spec, 64, m.payload())
    assert torch.allclose(u.float() * m.u_scale.float()[:, None], U)


# -- apply_plan ------------------------------------------------------------------------------

def tiny_model(seed=0):
    return build_model(Mamba2Config.preset("tiny"), seed=seed).eval()


def test_apply_plan_swaps_modules_and_rounds_kept_tensors():
    model = tiny_model()
    cfg = model.config
    plan = Plan(specs={"*.in_proj": Binary("row", 8), "backbone.layers.0.mixer.out_proj": IntN(4, 32),
                       "backbone.embedding": IntN(8)}, default=Keep("fp16"))
    apply_plan(model, plan)
    mods = compressed_modules(model)
    assert isinstance(mods["backbone.embedding"], IntNEmbedding)
    assert isinstance(mods["backbone.layers.2.mixer.in_proj"], BinaryLinear)
    assert isinstance(mods["backbone.layers.0.mixer.out_proj"], IntNLinear)
    kept = model.backbone.layers[1].mixer.out_proj.weight
    assert kept.dtype == torch.float32 and torch.equal(kept, kept.half().float())
    a_log = model.backbone.layers[0].mixer.A_log
    assert torch.equal(a_log, a_log.half().float())
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=gen(9))
    logits = model(ids)
    assert logits.shape == (2, 12, cfg.vocab_padded) and torch.isfinite(logits).all()
    with pytest.raises(DfplanError, match="already compressed"):
        apply_plan(model, plan)


def test_apply_plan_int8_stays_close_to_fp():
    ref_model = tiny_model(1)
    model = tiny_model(1)
    apply_plan(model, layout_plan("int8", model.config))
    ids = torch.randint(0, 4096, (1, 16), generator=gen(10))
    with torch.no_grad():
        a, b = ref_model(ids), model(ids)
    assert float((a - b).square().mean() / a.square().mean()) < 0.02


def test_bad_plan_leaves_the_model_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for plan in (Plan(specs={"*.in_proj": IntN(8), "backbone.layers.7.mixer.in_proj": IntN(4)}),
                 Plan(specs={"*.out_proj": Binary("row", 999)}),
                 Plan(specs={"*.in_proj": IntN(4, 100)})):
        with pytest.raises(DfplanError):
            apply_plan(model, plan)
    assert not compressed_modules(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.backbone.embedding, Embedding)


def test_zero_init_is_reproducible_with_a_generator():
    w = torch.randn(40, 24, generator=gen(11))
    a = BinaryLinear.from_float(w, Binary("row", 4, init="zero"), generator=gen(0))
    b = BinaryLinear.from_float(w, Binary("row", 4, init="zero"), generator=gen(0))
    assert torch.equal(a.v, b.v) and int(a.u.abs().max()) == 0
