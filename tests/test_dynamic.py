"""Dynamic support: sparse recovery at the compressed-sensing rate, sliced decoding against
normal decoding (full support) and against its masked full-size reference (any support),
format-preserving slices of float / IntN / 1-bit layers, and `dfplan bench dynamic`."""
import copy
import json
import math

import pytest
import torch

from dfplan.config import Mamba2Config
from dfplan.dynamic.masked import DynamicModel
from dfplan.dynamic.recovery import recover_support
from dfplan.dynamic.reference import masked_step_ref
from dfplan.dynamic.select import make_support
from dfplan.dynamic.sketch import measure, prompt_energies, sketch_matrix
from dfplan.dynamic.slicing import slice_linear
from dfplan.dynamic.units import LayerSupport, full_support, random_balanced, unit_layout
from dfplan.formats.apply import apply_plan
from dfplan.formats.modules import BinaryLinear, IntNLinear
from dfplan.formats.plan import Plan, model_signature
from dfplan.formats.specs import Binary, IntN, Keep
from dfplan.model import build_model

pytest.importorskip("sklearn")

BASE = Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, headdim=16, d_state=16,
                                           chunk_size=16, vocab_size=300)
HYBRID = Mamba2Config(d_model=64, n_layer=3, vocab_size=300, d_state=16, headdim=16, chunk_size=16,
                      attn_layer_idx=(1,), d_intermediate=96, tie_embeddings=False, bias=True,
                      attn_cfg={"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "mlp_dim": 32},
                      name="hybrid")


# --- sparse recovery -----------------------------------------------------------------------

def _success_rate(n, k, m, method, sketch, trials=20):
    ok = 0
    for t in range(trials):
        g = torch.Generator().manual_seed(7919 * m + t)
        true = torch.randperm(n, generator=g)[:k].sort().values
        e = torch.zeros(n, dtype=torch.float64)
        e[true] = 1 + torch.rand(k, generator=g, dtype=torch.float64)   # energies: > 0
        phi = sketch_matrix(m, n, sketch, g)
        ok += torch.equal(recover_support(phi, measure(phi, e), k, method), true)
    return ok / trials


@pytest.mark.parametrize("method", ["omp", "lasso"])
@pytest.mark.parametrize("sketch", ["gaussian", "rademacher"])
def test_recovery_succeeds_at_theory_rate_and_fails_well_below(method, sketch):
    n, k = 256, 8
    rate = k * math.log(n / k)                       # ~27.7: m ~ C k log(n/k) measurements
    assert _success_rate(n, k, math.ceil(4 * rate), method, sketch) >= 0.9
    assert _success_rate(n, k, math.floor(0.5 * rate), method, sketch) <= 0.1


def test_sketch_matrices_have_unit_column_norm_on_average():
    g = torch.Generator().manual_seed(0)
    for kind in ("gaussian", "rademacher"):
        phi = sketch_matrix(400, 50, kind, g)
        assert abs(float(phi.pow(2).sum(0).mean()) - 1.0) < 0.05
    r = sketch_matrix(8, 8, "rademacher", g)
    assert torch.allclose(r.abs(), torch.full_like(r, 8 ** -0.5)) and (r > 0).any() and (r < 0).any()


# --- helpers ---------------------------------------------------------------------------------

def _model(cfg, specs=None):
    model = build_model(cfg, seed=0).eval()
    if specs:
        apply_plan(model, Plan(specs=specs, default=Keep("fp32"), model=model_signature(cfg)),
                   generator=torch.Generator().manual_seed(0))
    return model


def _random_cache(model, b, g):
    """A decode cache with random (never zero) states, as if after a prompt of 9 tokens."""
    cache = model.new_cache(b)
    for blk, lc in zip(model.backbone.layers, cache.layers):
        if blk.is_attention:
            m = blk.mixer
            lc["k"] = torch.randn(b, 9, m.num_heads_kv, m.head_dim, generator=g)
            lc["v"] = torch.randn(b, 9, m.num_heads_kv, m.head_dim, generator=g)
        else:
            lc["conv"].copy_(torch.randn(lc["conv"].shape, generator=g))
            lc["ssm"].copy_(torch.randn(lc["ssm"].shape, generator=g) * 0.5)
    cache.seqlen = 9
    return cache


def _random_support(layout, g, fraction=0.5):
    sup = {}
    for grp in layout:
        k = max(grp.balance, round(fraction * grp.n_units / grp.balance) * grp.balance)
        rho = 0.3 + 0.7 * float(torch.rand(1, generator=g)) if grp.kind == "ssm" else 1.0
        sup[grp.key] = LayerSupport(random_balanced(grp.n_units, k, grp.balance, g), rho)
    return sup


CASES = {
    "heads": (BASE, None, None),
    "groups-blocks": (BASE.replace(ngroups=2, D_has_hdim=True), 8, None),
    "norm-before-gate": (BASE.replace(norm_before_gate=True), 4, None),
    "head-pairs": (BASE, 32, None),
    "hybrid": (HYBRID, 8, None),
    "packed": (BASE.replace(ngroups=2), 8, {"*.in_proj": Binary("row", 8), "*.out_proj": IntN(8),
                                            "backbone.layers.0.mixer.out_proj": Binary("fbi", 4, 4)}),
    "packed-hybrid": (HYBRID, 4, {"*.in_proj": IntN(4, 16), "*.out_proj": Binary("row", 4, 4),
                                  "*.fc1": IntN(3), "*.fc2": IntN(4, 16, symmetric=False)}),
}


# --- decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["heads", "groups-blocks", "hybrid", "packed"])
def test_full_support_equals_normal_decoding(case):
    cfg, block, specs = CASES[case]
    model = _model(cfg, specs)
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    layout = unit_layout(model, block, mlp_block=32)
    logits, cache, _ = prompt_energies(model, ids, layout)
    with torch.no_grad():
        assert torch.equal(logits, model(ids))                   # the hooks only observe
        dyn = DynamicModel(model, full_support(layout), layout)
        c_full, c_dyn = copy.deepcopy(cache), dyn.slice_cache(cache)
        nxt_a = nxt_b = logits[:, -1].argmax(-1)
        for _ in range(6):
            a, b = model.step(nxt_a, c_full), dyn.step(nxt_b, c_dyn)
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max()))
            nxt_a, nxt_b = a.argmax(-1), b.argmax(-1)
            assert torch.equal(nxt_a, nxt_b)


@pytest.mark.parametrize("case", list(CASES))
def test_sliced_decode_equals_masked_reference(case):
    cfg, block, specs = CASES[case]
    model = _model(cfg, specs)
    layout = unit_layout(model, block, mlp_block=32)
    g = torch.Generator().manual_seed(len(case))
    sup = _random_support(layout, g)
    cache = _random_cache(model, 3, g)
    with torch.no_grad():
        dyn = DynamicModel(model, sup, layout)
        c_ref, c_dyn = copy.deepcopy(cache), dyn.slice_cache(cache)
        for t in range(3):
            ids = torch.randint(0, cfg.vocab_size, (3,), generator=g)
            if t == 0:
                full = model.step(ids, copy.deepcopy(cache))
            ref = masked_step_ref(model, sup, layout, ids, c_ref)
            out = dyn.step(ids, c_dyn)
            scale = float(ref.abs().max())
            assert (out - ref).abs().max() <= 2e-5 * scale, case
            if t == 0:
                first = ref
    assert c_dyn.seqlen == c_ref.seqlen == 12
    assert (full - first).abs().max() > 1e-3 * float(full.abs().max())                         # the support changed something


def test_dynamic_model_leaves_the_base_model_unchanged():
    model = _model(HYBRID)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = unit_layout(model, 8, mlp_block=32)
    DynamicModel(model, _random_support(layout, torch.Generator().manual_seed(0)), layout)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.backbone.layers[1].mixer.num_heads == 4


def test_supports_keep_the_requested_units():
    model = _model(BASE.replace(ngroups=2))
    layout = unit_layout(model, 8)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(0))
    _, _, en = prompt_energies(model, ids, layout)
    for kind in ("oracle", "random", "sketch"):
        sup = make_support(kind, layout, en, 0.25, m_frac=0.5)
        for grp in layout:
            keep = sup[grp.key].keep
            assert keep.numel() == 4 and torch.equal(keep, keep.unique())
            assert (keep < 8).sum() == (keep >= 8).sum()            # balanced over the 2 groups
            assert 0 < sup[grp.key].rho < 1
    oracle = make_support("oracle", layout, en, 0.25)
    for grp in layout:                                            # oracle = top energies
        e = en.post[grp.key]
        kept = e[oracle[grp.key].keep]
        for half in (slice(0, 8), slice(8, 16)):
            mask = torch.zeros(16, dtype=torch.bool)
            mask[oracle[grp.key].keep] = True
            assert e[half][mask[half]].min() >= e[half][~mask[half]].max()
        assert kept.numel() == 4


# --- slicing of each format -----------------------------------------------------------------------

SLICE_SPECS = [None, IntN(8), IntN(4, 8), IntN(3, 0, symmetric=False), Binary("row"),
               Binary("row", 4, 8), Binary("fbi", 4, 3)]


@pytest.mark.parametrize("spec", SLICE_SPECS, ids=lambda s: "float" if s is None else s.name)
@pytest.mark.parametrize("aligned", [True, False])
def test_slice_linear_keeps_format_and_values(spec, aligned):
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(48, 40, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(40, 48, generator=g))
        lin.bias.copy_(torch.randn(40, generator=g))
    mod = lin if spec is None else (BinaryLinear if isinstance(spec, Binary) else IntNLinear).from_float(
        lin.weight, spec, bias=lin.bias, generator=torch.Generator().manual_seed(0))
    rows = torch.randperm(40, generator=g)[:17].sort().values
    if aligned:                                                   # whole groups of 8 columns
        cols = (torch.tensor([0, 2, 5])[:, None] * 8 + torch.arange(8)).reshape(-1)
    else:
        cols = torch.randperm(48, generator=g)[:21].sort().values
    if isinstance(spec, IntN) and spec.group and not aligned:
        with pytest.raises(Exception, match="whole groups"):
            slice_linear(mod, rows, cols)
        return
    new = slice_linear(mod, rows, cols)
    assert type(new) is type(mod) and getattr(new, "spec", None) == getattr(mod, "spec", None)
    W = mod.weight if spec is None else mod.dequantize()
    W2 = new.weight if spec is None else new.dequantize()
    assert torch.equal(W2, W[rows][:, cols])
    x = torch.randn(5, 48, generator=g)
    x[:, [c for c in range(48) if c not in set(cols.tolist())]] = 0  # what the sliced layer ignores
    with torch.no_grad():
        want = mod(x)[:, rows]
        got = new(x[:, cols].contiguous())
    assert torch.allclose(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


# --- the benchmark -------------------------------------------------------------------------------

def test_bench_dynamic_cli(tmp_path):
    from dfplan.cli import main
    from dfplan.loading import save_mamba_ssm

    ckpt = tmp_path / "m"
    save_mamba_ssm(build_model(BASE, seed=0).eval(), ckpt)
    out = tmp_path / "out"
    rc = main(["bench", "dynamic", "--model", str(ckpt), "--out", str(out), "--prompts", "2",
               "--prompt-len", "12", "--gen", "4", "--keep", "0.5,1", "--m", "0.5",
               "--block", "8", "--budget", "0.02", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "dynamic.json").read_text())
    q = {(r["keep"], r["support"], r["m_frac"]): r for r in res["quality"]}
    assert set(q) == {(f, s, m) for f in (0.5, 1.0) for s, m in
                      (("oracle", None), ("sketch", 0.5), ("random", None), ("static", None))}
    for s in ("oracle", "sketch", "random", "static"):                     # keeping everything is exact
        r = q[(1.0, s, 0.5 if s == "sketch" else None)]
        assert r["kl"] < 1e-9 and r["top1_agree"] == 1.0
        assert 1.0 <= r["weight_fraction"] < 1.05       # + dt rows copied per 8-channel block
    assert q[(0.5, "oracle", None)]["kl"] > 0
    assert q[(0.5, "oracle", None)]["energy_captured"] >= q[(0.5, "random", None)]["energy_captured"]
    assert [r["keep"] for r in res["speed"]] == [0.5, 1.0]
    assert all(r["dynamic_ms"] > 0 and r["full_ms"] > 0 for r in res["speed"])
    bound = {r["keep"]: r["bandwidth_bound_speedup"] for r in res["speed"]}
    assert bound[0.5] > 1.2 and 0.95 < bound[1.0] <= 1.0         # fewer bytes per step at 0.5
    assert main(["bench", "dynamic", "--model", str(ckpt), "--out", str(out), "--keep", "1.5"]) == 2
    assert main(["bench", "dynamic", "--model", str(ckpt), "--out", str(out), "--block", "5"]) == 2
