"""Decode fast paths: IntN 2/3/4 unpacked once (no per-call dequantization), the fbgemm int8
head, state precision, and the CUDA-graph step (CUDA only)."""
import pytest
import torch
import torch.nn.functional as F

from dfplan.config import Mamba2Config
from dfplan.formats.modules import BinaryLinear, IntNEmbedding, IntNLinear
from dfplan.formats.specs import Binary, IntN
from dfplan.kernels import cpu, fbgemm
from dfplan.kernels.packing import ROW_BLOCKS, ROWS
from dfplan.model import InferenceCache, build_model
from dfplan.runtime.statekl import state_dtype_kl

G = torch.Generator().manual_seed(0)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("spec", [IntN(2), IntN(3), IntN(4), IntN(4, 16), IntN(3, 0, False)])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_intn_fast_path_matches_reference(spec, rows):
    w = torch.randn(96, 64, generator=G)
    m = IntNLinear.from_float(w, spec, bias=torch.randn(96, generator=G))
    x = torch.randn(rows, 64, generator=G)
    with torch.no_grad():
        y, ref = m(x), m.forward_reference(x)
    # int8 activations (ours per token, fbgemm per row) cost ~1% relative error at most
    assert _rel(y, ref) < 2e-2
    kind, _ = m.fast_weights()
    assert kind == ("dense" if spec.group or not spec.symmetric else
                    "fbgemm" if fbgemm.available() else "int8")


def test_intn_cache_is_built_once_and_follows_in_place_edits(monkeypatch):
    from dfplan.formats import quant
    m = IntNLinear.from_float(torch.randn(32, 48, generator=G), IntN(4))
    calls = []
    real = quant.unpack_intn
    monkeypatch.setattr(quant, "unpack_intn", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 48, generator=G)
    with torch.no_grad():
        for _ in range(5):
            m(x)
    assert len(calls) == 1                       # one unpack, not one per call
    with torch.no_grad():
        m.qweight.copy_(torch.randint(0, 255, m.qweight.shape, dtype=torch.uint8, generator=G))
        y = m(x)
        assert len(calls) == 2                   # rebuilt after the in-place edit
        assert _rel(y, m.forward_reference(x)) < 2e-2


@pytest.mark.parametrize("bits", [8, 4])
def test_int8_head_fbgemm_matches_our_kernel(bits, monkeypatch):
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no fbgemm")
    emb = IntNEmbedding.from_float(torch.randn(500, 64, generator=G) * 0.02, IntN(bits))
    h = torch.randn(2, 5, 64, generator=G)
    monkeypatch.setenv("DFPLAN_FBGEMM", "1")           # opt-in
    with torch.no_grad():
        ref = emb.attend_reference(h)
        fast = emb.attend(h)
        assert emb.head_weights()[0] == "fbgemm"
        monkeypatch.setenv("DFPLAN_FBGEMM", "0")
        emb._fast = None
        ours = emb.attend(h)
    assert _rel(fast, ref) < 2e-2 and _rel(ours, ref) < 2e-2
    # per-row quantization: a row's result does not depend on the rest of the batch
    monkeypatch.setenv("DFPLAN_FBGEMM", "1")
    emb._fast = None
    with torch.no_grad():
        assert torch.equal(emb.attend(h[:1, :1]), emb.attend(h)[:1, :1])


def test_state_dtype_kl_is_measured_and_ordered():
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, d_model=64, n_layer=2, headdim=16,
                                              d_state=16, vocab_size=256)
    m = build_model(cfg, seed=0).eval()
    ids = torch.randint(0, 256, (1, 12), generator=G)
    r32 = state_dtype_kl(m, ids, 24, "fp32")
    r16 = state_dtype_kl(m, ids, 24, "bf16")
    assert r32["kl_mean"] == 0.0 and r16["kl_mean"] > 0.0 and r16["tokens"] == 24


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_eager():
    from dfplan.runtime.cudagraph import GraphStep
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16)
    m = build_model(cfg, seed=0).eval().cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 9), device="cuda")
    with torch.no_grad():
        _, c1 = m(ids, return_cache=True)
        _, c2 = m(ids, return_cache=True)
        g = GraphStep(m, c2, 2)
        tok = ids[:, -1]
        for _ in range(6):
            a, b = m.step(tok, c1), g(tok, c2)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            tok = a.argmax(-1)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_step_low_precision_state_equals_reference(state_dtype):
    from dfplan.kernels import cpu, mamba2_step
    from dfplan.kernels.step_ref import mamba2_step_ref
    if not cpu.available():
        pytest.skip("CPU kernels not built")
    B, H, P, N, Gr, K = 2, 8, 16, 40, 2, 4   # N = 32 + 8: vector body and tail
    d_inner = H * P
    conv_dim = d_inner + 2 * Gr * N
    zx = torch.randn(B, d_inner + conv_dim + H, generator=G)
    cs = torch.randn(B, conv_dim, K, generator=G)
    ss = torch.randn(B, H, P, N, generator=G).to(state_dtype)
    w = [torch.randn(conv_dim, 1, K, generator=G), torch.randn(conv_dim, generator=G),
         torch.randn(H, generator=G), torch.randn(H, generator=G), torch.randn(H, generator=G),
         torch.randn(d_inner, generator=G)]
    cs2, ss2 = cs.clone(), ss.clone()
    for _ in range(3):
        y = mamba2_step(zx, cs, ss, *w, 1e-5, Gr, P, N, backend="cpu")
        y2 = mamba2_step_ref(zx, cs2, ss2, *w, 1e-5, Gr, P, N)
        torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    assert ss.dtype == state_dtype
    # both round the fp32 update to the state dtype (nearest even); the kernel's fused
    # multiply-add may land on the other side of a rounding boundary: one ulp at most
    ulp = 1e-5 if state_dtype == torch.float32 else torch.finfo(state_dtype).eps
    torch.testing.assert_close(ss.float(), ss2.float(), rtol=ulp, atol=1e-5)
    if state_dtype != torch.float32:       # fp32 differs in the last bits everywhere (fma)
        assert (ss.float() != ss2.float()).float().mean() < 0.01


@pytest.mark.parametrize("lean", [True, False])
def test_profile_breakdown_sums_to_the_step(tmp_path, lean):
    import dfplan
    from dfplan.runtime.profile import profile_decode, step_bytes
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, d_model=64, n_layer=2, headdim=16,
                                              d_state=16, vocab_size=256)
    m = build_model(cfg, seed=0).eval()
    dfplan.compress(m, "layout:dfssm")
    r = profile_decode(m, prompt_len=10, new_tokens=8, lean=lean)
    # dfssm: every linear is 1-bit, so the lean step is the C++ layer loop, timed by itself
    assert r["step"] == ("lean (C++ layer loop)" if lean else "model.step")
    assert abs(sum(r["breakdown_ms"].values()) - r["ms_per_token"]) < 1e-6 * max(1.0, r["ms_per_token"])
    assert {"in_proj", "out_proj", "fused SSM step"} <= set(r["breakdown_ms"])
    b = step_bytes(m)
    # state: 2 layers x H x P x N fp32, read and written
    assert b["ssm_state_rw"] == 2 * 2 * cfg.nheads * cfg.headdim * cfg.d_state * 4
    assert step_bytes(m, torch.bfloat16)["ssm_state_rw"] == b["ssm_state_rw"] // 2
    assert not hasattr(m, "embed") or "embed" not in vars(m)          # wrappers removed


def _lean_case(layout, state):
    """A 3-layer model in `layout`, and two equal batch-2 caches after prefilling two prompts."""
    import dfplan
    from dfplan.runtime.decode import prefill
    from dfplan.runtime.leanstep import lean_ok
    cfg = Mamba2Config.preset("tiny").replace(chunk_size=16, d_model=64, n_layer=3, headdim=16,
                                              d_state=16, vocab_size=256)
    m = build_model(cfg, seed=3).eval()
    if layout:
        dfplan.compress(m, f"layout:{layout}")
    if not lean_ok(m):
        pytest.skip("CPU kernels not available")
    ids = torch.randint(0, 256, (2, 11), generator=G)
    caches = m.new_cache(2, state_dtype=state), m.new_cache(2, state_dtype=state)
    with torch.no_grad():
        for c in caches:
            for i in range(2):
                prefill(m, ids[i:i + 1], InferenceCache(0, [{k: v[i:i + 1] for k, v in lc.items()} for lc in c.layers]))
    return m, ids, caches


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("layout", [None, "dfssm", "bimamba", "int4"])
@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
def test_lean_step_equals_model_step(layout, state, threads):
    """The Python layer loop (torch's fused rms_norm, the same kernels) against model.step."""
    from dfplan.runtime.leanstep import LeanStep
    m, ids, (c1, c2) = _lean_case(layout, state)
    lean = LeanStep(m, c2, stack=False)
    tok = ids[:, -1]
    with torch.no_grad():
        for _ in range(6):
            a, b = m.step(tok, c1), lean(tok, c2)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            tok = a.argmax(-1)
    for la, lb in zip(c1.layers, c2.layers):
        torch.testing.assert_close(lb["ssm"].float(), la["ssm"].float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [None, "dfssm", "bimamba", "int4"])
@pytest.mark.parametrize("state", [torch.float32, torch.bfloat16])
def test_lean_stack_equals_its_python_twin(layout, state, threads):
    """The C++ layer loop (all-1-bit layouts) against the Python loop with the C++ loop's own
    norm: equal bit for bit, logits and states, token after token."""
    from dfplan.runtime.leanstep import LeanStep
    m, ids, (c1, c2) = _lean_case(layout, state)
    lean = LeanStep(m, c2, stack=True)
    assert (lean.stack is not None) == (layout in ("dfssm", "bimamba"))
    if lean.stack is None:
        return
    twin = LeanStep(m, c1, stack=False, cpp_norm=True)
    tok = ids[:, -1]
    with torch.no_grad():
        for _ in range(6):
            a, b = twin(tok, c1), lean(tok, c2)
            assert torch.equal(a, b)
            tok = a.argmax(-1)
    for la, lb in zip(c1.layers, c2.layers):
        assert torch.equal(la["ssm"], lb["ssm"]) and torch.equal(la["conv"], lb["conv"])


@pytest.mark.parametrize("first", [True, False])
def test_stack_norm_matches_torch(first):
    """The C++ loop's residual add + RMSNorm against torch (d = 100: not a multiple of 8)."""
    ext = cpu.extension()
    if ext is None:
        pytest.skip("CPU kernels not available")
    hidden, residual = torch.randn(3, 100, generator=G), torch.randn(3, 100, generator=G)
    w = torch.rand(100, generator=G) + 0.5
    expect_res = hidden.clone() if first else hidden + residual
    res = residual.clone()
    out = ext.add_rms_norm_(hidden, res, first, w, 1e-5)
    torch.testing.assert_close(res, expect_res, rtol=0, atol=0)
    torch.testing.assert_close(out, F.rms_norm(expect_res, (100,), w, 1e-5), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="fp32"):
        ext.add_rms_norm_(hidden.double(), res, first, w, 1e-5)


def test_lean_step_not_used_for_hybrids():
    from dfplan.runtime.leanstep import lean_ok
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=300, d_state=16, headdim=16, chunk_size=16,
                       attn_layer_idx=(1,), attn_cfg={"num_heads": 4, "num_heads_kv": 2}, name="h")
    assert not lean_ok(build_model(cfg, seed=0))


@pytest.mark.parametrize("spec", [Binary("row", 8), Binary("fbi", 0), Binary("row", 4, 4)])
def test_binary_fast_bit_order_is_in_place_and_invisible(spec):
    if cpu.extension() is None or cpu.best_isa() < 1:
        pytest.skip("the row-block order is used by the AVX2 / AVX-512 C++ kernels only")
    m = BinaryLinear.from_float(torch.randn(130, 200, generator=G), spec, bias=torch.randn(130, generator=G))
    x1, x5 = torch.randn(1, 200, generator=G), torch.randn(5, 200, generator=G)
    with torch.no_grad():
        y1, y5 = m(x1), m(x5)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        w = m.dequantize()
        ptr = m.bits.data_ptr()
        assert m.fast_weights() == ROW_BLOCKS
        assert m.bits.data_ptr() == ptr                  # reordered in place: no second copy
        assert not torch.equal(m.bits, sd["bits"])
        assert torch.equal(m(x1), y1) and torch.equal(m(x5), y5)
        # what is saved, dequantized or moved is row-major as before
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())
        assert torch.equal(m.payload()["bits"], sd["bits"]) and torch.equal(m.dequantize(), w)
        m.float()                                        # a move that stays on CPU keeps the order
        assert m.bits_layout == ROW_BLOCKS and torch.equal(m(x1), y1)
        m2 = BinaryLinear.from_float(torch.randn(130, 200, generator=G), spec, bias=torch.randn(130, generator=G))
        m2.fast_weights()
        m2.load_state_dict(sd)                           # row-major bytes copied in
        assert m2.bits_layout == ROWS and torch.equal(m2(x1), y1)
        meta = m.to("meta")                              # another device gets row-major bits
        assert meta.bits_layout == ROWS


def test_row_blocks_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DFPLAN_ROW_BLOCKS", "0")        # A/B timing of the two byte orders
    m = BinaryLinear.from_float(torch.randn(64, 64, generator=G), Binary("row", 0))
    before = m.bits.clone()
    assert m.fast_weights() == ROWS and torch.equal(m.bits, before)
