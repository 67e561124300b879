"""The torch-free runtime (dfplan/lite) against the torch model that wrote the artifact."""
import ctypes
import json
import subprocess
import sys

import pytest
import torch

import dfplan
from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.model import build_model
from dfplan.tokenizer import train_bpe

CFG = Mamba2Config.preset("tiny").replace(chunk_size=16, vocab_size=320, d_model=64, n_layer=3,
                                          headdim=16, d_state=16, name="t")
IDS = [5, 17, 200, 31, 7, 99, 250, 12, 3, 64, 128]


def _lite():
    from dfplan.lite import native
    try:
        native.library()
    except DfplanError as e:
        pytest.skip(f"lite library not buildable here: {e}")


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["hello world, the quick brown fox jumps over the lazy dog. " * 40], 300)


def _packed(tmp_path_factory, tok, layout):
    _lite()
    d = tmp_path_factory.mktemp(f"packed-{layout}")
    m = build_model(CFG, seed=1).eval()
    plan = f"layout:{layout}"
    specs = {
        # FBI scales with a rank-8 correction, plain 1-bit without one
        "mixed": {"*.in_proj": "fbi+r8", "*.out_proj": "bin", "backbone.embedding": "int8"},
        # what a search among the default candidates writes: 1-bit and IntN of every width
        "intn": {"*.in_proj": "int4", "backbone.layers.1.mixer.in_proj": "int3",
                 "*.out_proj": "bin+r8", "backbone.layers.0.mixer.out_proj": "int2",
                 "backbone.layers.2.mixer.out_proj": "int8", "backbone.embedding": "int4"},
        # a projection the plan keeps in fp16 beside 1-bit ones, the embedding int8
        "kept": {"*.in_proj": "bin+r8", "*.out_proj": "bin", "backbone.layers.1.mixer.out_proj": "fp16",
                 "backbone.layers.2.mixer.in_proj": "fp16", "backbone.embedding": "int8"},
    }
    if layout in specs:
        plan = d.parent / f"{layout}-plan.json"
        plan.write_text(json.dumps({"format": "dfplan-plan", "version": 1, "default": "fp16",
                                    "specs": specs[layout]}))
    dfplan.compress(m, plan)
    dfplan.save_packed(m, d, tokenizer=tok)
    return d


@pytest.fixture(scope="module", params=["dfssm", "dfssm-scaffold", "mixed", "intn", "kept", "bimamba", "fp16"])
def packed(request, tmp_path_factory, tok):
    return _packed(tmp_path_factory, tok, request.param)


@pytest.fixture(scope="module")
def dfssm(tmp_path_factory, tok):
    return _packed(tmp_path_factory, tok, "dfssm")


def _torch_steps(path, ids, state_dtype="fp32"):
    """Logits after each id, stepping the loaded torch model (C++ layer loop)."""
    from dfplan.runtime.decode import STATE_DTYPES
    from dfplan.runtime.leanstep import LeanStep, lean_ok
    mod = dfplan.load(path, dtype=torch.float32).module
    assert lean_ok(mod)
    cache = mod.new_cache(1, state_dtype=STATE_DTYPES[state_dtype])
    step = LeanStep(mod, cache)
    return [step(torch.tensor([i]), cache)[0].clone() for i in ids]


def _close(a, b, rel=1e-4):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


def test_lite_steps_equal_the_torch_model(packed):
    from dfplan import lite
    m = lite.load(packed)
    want = _torch_steps(packed, IDS)
    m.reset()
    for i, ref in zip(IDS, want):
        got = torch.tensor(list(m.forward([i])))
        # same kernels; only the head's RMSNorm sums in another order than torch's (~1e-7)
        assert _close(got, ref), float((got - ref).abs().max())
    assert got.shape == (CFG.vocab_padded,)


@pytest.mark.parametrize("state", ["fp32", "bf16"])
def test_prefill_chunks_equal_token_by_token(packed, state):
    """The fused step over a chunk's tokens (head by head) against one token at a time."""
    from dfplan import lite
    stepped = lite.load(packed, prefill_chunk=1, state_dtype=state)
    stepped.reset()
    for i in IDS:
        one = torch.tensor(list(stepped.forward([i])))
    for chunk in (4, 64):
        got = torch.tensor(lite.load(packed, prefill_chunk=chunk, state_dtype=state).logits(IDS))
        assert _close(got, one, 1e-5)
    # and the state after a prefill carries on: prefill 6, then step the rest
    m = lite.load(packed, prefill_chunk=4, state_dtype=state)
    m.reset()
    m.forward(IDS[:6])
    for i in IDS[6:]:
        last = torch.tensor(list(m.forward([i])))
    assert _close(last, one, 1e-5)


@pytest.mark.parametrize("state", ["bf16", "fp16"])
def test_low_precision_state_equals_torch_and_stays_near_fp32(dfssm, state):
    from dfplan import lite
    m = lite.load(dfssm, state_dtype=state)
    assert m.state_dtype_name == state and m.state_bytes() < lite.load(dfssm).state_bytes()
    want = _torch_steps(dfssm, IDS, state)
    m.reset()
    for i, ref in zip(IDS, want):
        got = torch.tensor(list(m.forward([i])))
        assert _close(got, ref, 1e-3)
    assert _close(got, torch.tensor(lite.load(dfssm).logits(IDS)), 5e-2)


def test_greedy_ids_equal_the_torch_model_step_by_step(dfssm):
    from dfplan import lite
    m = lite.load(dfssm)
    out = m.generate(IDS[:3], 12)
    assert out[:3] == IDS[:3] and len(out) == 15
    # teacher-forced on lite's own ids, torch's argmax agrees wherever the top two are apart
    # (over the real vocabulary, as both runtimes sample: not the padding rows)
    refs = [r[:CFG.vocab_size] for r in _torch_steps(dfssm, out[:-1])]
    compared = 0
    for k in range(2, len(out) - 1):
        top2 = refs[k].topk(2).values
        if float(top2[0] - top2[1]) > 1e-3 * float(refs[k].abs().max()):
            assert int(refs[k].argmax()) == out[k + 1]
            compared += 1
    assert compared >= 6


def test_sampling_is_seeded_and_filtered(dfssm):
    from dfplan import lite
    m = lite.load(dfssm)
    kw = dict(temperature=1.0, top_k=20, top_p=0.9)
    a = m.generate(IDS[:4], 16, seed=7, **kw)
    assert a == m.generate(IDS[:4], 16, seed=7, **kw)
    assert a != m.generate(IDS[:4], 16, seed=8, **kw)
    assert m.generate(IDS[:4], 8, temperature=1.0, top_k=1, seed=3) == m.generate(IDS[:4], 8)


def test_sampler_keeps_to_top_k_and_top_p():
    _lite()
    from dfplan.lite import native
    lib = native.library()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=g) * 3
    buf = (ctypes.c_float * 500)(*logits.tolist())
    order = logits.argsort(descending=True).tolist()
    probs = torch.softmax(logits, 0)[order]
    nucleus = int((probs.cumsum(0) - probs < 0.8).sum())          # tokens top-p 0.8 keeps
    assert lib.dfl_sample(buf, 500, 0.0, 0, 1.0, 0.5) == order[0]
    seen_k, seen_p = set(), set()
    for k in range(400):
        u = (k + 0.5) / 400
        seen_k.add(lib.dfl_sample(buf, 500, 1.0, 5, 1.0, u))
        seen_p.add(lib.dfl_sample(buf, 500, 1.0, 0, 0.8, u))
    assert seen_k == set(order[:5])
    assert seen_p == set(order[:nucleus])


def test_text_streams_equal_the_whole_and_stop(dfssm):
    from dfplan import lite
    m = lite.load(dfssm)
    whole = m.generate_text("hello world", max_new_tokens=24, eos=False)
    assert "".join(m.generate_text("hello world", max_new_tokens=24, eos=False, stream=True)) == whole
    assert whole == m.tokenizer.decode(m.generate(m.tokenizer.encode("hello world").ids, 24, eos=False)[2:])
    texts = m.generate_text(["hello world", "the quick"], max_new_tokens=24, eos=False)
    assert texts == [whole, m.generate_text("the quick", max_new_tokens=24, eos=False)]
    if len(whole) > 3:
        stop = whole[2:4]
        cut = m.generate_text("hello world", max_new_tokens=24, eos=False, stop=[stop])
        assert cut == whole[:whole.find(stop)]


def test_bad_input_is_refused(dfssm, tmp_path, tok):
    from dfplan import lite
    m = lite.load(dfssm)
    for kw, msg in ((dict(max_new_tokens=0), "positive"), (dict(top_p=0.0), "top_p"),
                    (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k")):
        with pytest.raises(DfplanError, match=msg):
            m.generate([1, 2], **{"max_new_tokens": 4, **kw})
    with pytest.raises(DfplanError, match="tokenizes to nothing"):
        m.generate_text("")
    with pytest.raises(DfplanError, match="top_p"):          # at the call, not at the first piece
        m.generate_text("hello", stream=True, top_p=2.0)
    with pytest.raises(DfplanError, match="outside"):
        m.forward([CFG.vocab_padded])
    with pytest.raises(DfplanError, match="outside"):
        m.generate([CFG.vocab_size], 2)
    with pytest.raises(DfplanError, match="state dtype"):
        lite.load(dfssm, state_dtype="int8")
    # grouped / asymmetric IntN are not the lite runtime's: it says which runtime is
    from dfplan.lite.support import unsupported
    cases = {"grouped": {"*.in_proj": "bin", "*.out_proj": "int4g16", "backbone.embedding": "int8"},
             "rank4bit": {"*.in_proj": "bin+r8i4", "*.out_proj": "bin", "backbone.embedding": "int8"},
             "asym": {"*.in_proj": "bin", "*.out_proj": "int4a", "backbone.embedding": "int8"}}
    for name, plan in cases.items():
        if isinstance(plan, dict):
            f = tmp_path / f"{name}.json"
            f.write_text(json.dumps({"format": "dfplan-plan", "version": 1, "default": "fp16", "specs": plan}))
            plan = f
        d = tmp_path / name
        mm = build_model(CFG, seed=1).eval()
        dfplan.compress(mm, plan)
        dfplan.save_packed(mm, d, tokenizer=tok)
        assert unsupported(d), name
        with pytest.raises(DfplanError, match="--runtime torch"):
            lite.load(d)
    # an asymmetric int8 embedding (a zero point per row) would be read wrong: refused
    plan = tmp_path / "asym.json"
    plan.write_text(json.dumps({"format": "dfplan-plan", "version": 1, "default": "fp16", "specs": {
        "*.in_proj": "bin", "*.out_proj": "bin", "backbone.embedding": "int8a"}}))
    mm = build_model(CFG, seed=1).eval()
    dfplan.compress(mm, plan)
    dfplan.save_packed(mm, tmp_path / "asym", tokenizer=tok)
    assert "embedding" in unsupported(tmp_path / "asym")
    assert unsupported(tmp_path) == "not a packed artifact"
    assert unsupported(dfssm) is None


def test_too_big_for_memory_is_refused_before_loading(dfssm, monkeypatch):
    from dfplan import lite, prompting
    monkeypatch.setattr(prompting, "mem_available", lambda: 2**10)
    with pytest.raises(DfplanError, match="free"):
        lite.load(dfssm)


def test_portable_path_agrees_with_the_vector_one(packed):
    """isa 0 (no AVX2: row-major bits, fp32 row vectors, scalar SSM step) against the default."""
    from dfplan import lite
    assert _close(lite.load(packed, isa=0).logits(IDS), lite.load(packed).logits(IDS), 1e-4)


def test_corrupt_artifact_names_the_file(dfssm, tmp_path):
    import shutil

    from dfplan import lite
    d = tmp_path / "copy"
    shutil.copytree(dfssm, d)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(DfplanError, match="model.safetensors.*sha256"):
        lite.load(d)


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_runtime_lite_and_auto(dfssm, capsys):
    from dfplan import lite
    want = lite.load(dfssm).generate_text("hello world", max_new_tokens=12, eos=False)
    for rt in ("lite", "auto"):
        rc, out, err = run(capsys, "generate", "--model", str(dfssm), "--prompt", "hello world",
                           "--max-new-tokens", "12", "--no-eos", "--stats", "--runtime", rt)
        assert rc == 0 and out == want + "\n"
        stats = json.loads(err.strip().splitlines()[-1])
        assert stats["runtime"] == "lite" and stats["new_tokens"] == 12
    rc, _, err = run(capsys, "generate", "--model", str(dfssm), "--prompt", "hi", "--runtime", "torch",
                     "--stats", "--max-new-tokens", "3")
    assert rc == 0 and json.loads(err.strip().splitlines()[-1])["runtime"] == "torch"


def test_cli_runtime_lite_refuses_what_it_cannot_run(capsys, tmp_path, tok):
    _lite()
    from dfplan.loading import save_mamba_ssm
    d = tmp_path / "ckpt"
    save_mamba_ssm(build_model(CFG, seed=0).eval(), d, tokenizer=tok)
    rc, _, err = run(capsys, "generate", "--model", str(d), "--prompt", "hi", "--runtime", "lite")
    assert rc == 2 and "--runtime torch" in err
    rc, out, err = run(capsys, "generate", "--model", str(d), "--prompt", "hi", "--max-new-tokens", "3",
                       "--stats")                                     # auto: falls to torch
    assert rc == 0 and json.loads(err.strip().splitlines()[-1])["runtime"] == "torch"


def test_auto_falls_back_to_torch_without_a_compiler(dfssm, capsys, monkeypatch):
    from dfplan.lite import native

    def no_compiler():
        raise DfplanError("the torch-free runtime needs a C++ compiler with OpenMP (g++)")
    monkeypatch.setattr(native, "library", no_compiler)
    rc, _, err = run(capsys, "generate", "--model", str(dfssm), "--prompt", "hi", "--max-new-tokens", "2",
                     "--stats")
    assert rc == 0 and json.loads(err.strip().splitlines()[-1])["runtime"] == "torch"
    rc, _, err = run(capsys, "generate", "--model", str(dfssm), "--prompt", "hi", "--runtime", "lite")
    assert rc == 2 and "compiler" in err


def test_lite_never_imports_torch(dfssm):
    code = ("import sys; from dfplan import lite; m = lite.load(sys.argv[1]); "
            "t = m.generate_text('hello', max_new_tokens=5, eos=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(len(m.generate([1, 2], 3)))")
    r = subprocess.run([sys.executable, "-c", code, str(dfssm)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "5"


def test_lite_library_builds_wherever_the_torch_kernels_do():
    """The other tests skip without a compiler; a source that does not compile must fail here,
    not skip: where the torch extension builds, the lite library (same sources) must too."""
    from dfplan.kernels import cpu
    if not cpu.available():
        pytest.skip(f"no CPU kernels here either: {cpu.build_error()}")
    from dfplan.lite import native
    lib = native.library()
    assert lib.dfl_abi(0) == native.ABI_VERSION
