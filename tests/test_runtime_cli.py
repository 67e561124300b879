"""`dfplan generate` and `dfplan pack` on tiny models: output, errors, pack == size."""
import json
import struct

import pytest
import torch

import dfplan
from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import train_bpe

CFG = Mamba2Config.preset("tiny").replace(chunk_size=16, vocab_size=320, d_model=64, n_layer=2,
                                          headdim=16, d_state=16, name="t")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = train_bpe(["hello world, the quick brown fox jumps over the lazy dog. " * 40], 300)
    save_mamba_ssm(build_model(CFG, seed=0).eval(), d, tokenizer=tok)
    return d


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_streams_the_api_text(ckpt, capsys):
    rc, out, err = run(capsys, "generate", "--model", str(ckpt), "--prompt", "hello world",
                       "--max-new-tokens", "20", "--no-eos", "--stats")
    assert rc == 0, err
    want = dfplan.load(ckpt).generate_text("hello world", max_new_tokens=20, eos=False)
    assert out == want + "\n"
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["prompt_tokens"] > 0 and stats["new_tokens"] == 20 and stats["peak_rss_bytes"] > 0
    assert "tok/s" in err and "prefill" in err


def test_generate_prompt_file_and_sampling(ckpt, capsys, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("the quick")
    args = ["generate", "--model", str(ckpt), "--prompt-file", str(f), "--max-new-tokens", "12",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9", "--seed", "5", "--no-eos"]
    rc1, out1, _ = run(capsys, *args)
    rc2, out2, _ = run(capsys, *args, "--no-stream")
    assert rc1 == rc2 == 0 and out1 == out2


@pytest.mark.parametrize("argv, msg", [
    (["--prompt", ""], "tokenizes to nothing"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--prompt", "hi", "--max-new-tokens", "-2"], "max-new-tokens"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    ([], "exactly one of --prompt"),
    (["--prompt-file", "/nonexistent/p.txt"], "does not exist"),
])
def test_generate_bad_input(ckpt, capsys, argv, msg):
    rc, out, err = run(capsys, "generate", "--model", str(ckpt), *argv)
    assert rc == 2 and msg in err and err.startswith("error: ") and out == ""


def test_generate_packed_without_tokenizer_says_how(capsys, tmp_path, ckpt):
    out = tmp_path / "packed"
    rc, _, err = run(capsys, "pack", "--model", "preset:tiny", "--plan", "layout:dfssm", "--out", str(out))
    assert rc == 0, err
    rc, _, err = run(capsys, "generate", "--model", str(out), "--prompt", "hi")
    assert rc == 2 and "--tokenizer" in err
    rc, text, err = run(capsys, "generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "3",
                        "--tokenizer", str(ckpt / "tokenizer.json"))
    assert rc == 0, err


def test_generate_corrupt_artifact(capsys, tmp_path, ckpt):
    out = tmp_path / "packed"
    assert run(capsys, "pack", "--model", str(ckpt), "--plan", "layout:int4", "--out", str(out))[0] == 0
    text = (out / "plan.json").read_text()
    (out / "plan.json").write_text(text.replace("int4", "int3", 1))      # same size, other bytes
    rc, _, err = run(capsys, "generate", "--model", str(out), "--prompt", "hi")
    assert rc == 2 and "plan.json" in err and "sha256" in err


def _payload(path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - n


@pytest.mark.parametrize("plan", ["layout:dfssm", "layout:int4", "layout:bimamba", "searched"])
def test_pack_equals_size_to_the_byte(ckpt, capsys, tmp_path, plan):
    if plan == "searched":     # a plan file with mixed formats, ranks and IntN widths
        p = tmp_path / "plan.json"
        p.write_text(json.dumps({"format": "dfplan-plan", "version": 1, "default": "fp16", "specs": {
            "*.in_proj": "bin+r8", "backbone.layers.1.mixer.in_proj": "int3",
            "*.out_proj": "int2g16a", "backbone.embedding": "int8"}}))
        plan = str(p)
    out = tmp_path / "o"
    rc, text, err = run(capsys, "pack", "--model", str(ckpt), "--plan", plan, "--out", str(out))
    assert rc == 0, err
    res = json.loads(text)
    size_args = ["--layout", plan[len("layout:"):]] if plan.startswith("layout:") else ["--plan", plan]
    rc, stext, err = run(capsys, "size", "--model", str(ckpt), *size_args, "--json")
    assert rc == 0, err
    total = json.loads(stext)["total_bytes"]
    assert res["payload_bytes"] == total == _payload(out / "model.safetensors")
    # and the artifact loads and runs, with the checkpoint's tokenizer carried over
    m = dfplan.load(out)
    assert m.tokenizer is not None and len(m.generate_text("hello", max_new_tokens=4, eos=False)) >= 0


def test_pack_refuses_a_busy_out_dir_and_unknown_layout(ckpt, capsys, tmp_path):
    (tmp_path / "x.txt").write_text("x")
    rc, _, err = run(capsys, "pack", "--model", str(ckpt), "--plan", "layout:dfssm", "--out", str(tmp_path))
    assert rc == 2 and "choose another --out" in err
    rc, _, err = run(capsys, "pack", "--model", str(ckpt), "--plan", "layout:nope", "--out", str(tmp_path / "n"))
    assert rc == 2 and "unknown layout" in err and not (tmp_path / "n").exists()


def test_randomized_correction_close_to_exact():
    from dfplan.formats import quant
    g = torch.Generator().manual_seed(0)
    # a residual with a decaying spectrum, like real weights'
    r = (torch.randn(300, 16, generator=g) * torch.logspace(0, -1, 16)) @ torch.randn(16, 200, generator=g)
    r += 0.01 * torch.randn(300, 200, generator=g)
    u, v = quant.lowrank_factors(r, 8)
    with quant.lowrank_method("randomized"):
        ur, vr = quant.lowrank_factors(r, 8)
    e_exact = (r - u @ v).norm()
    e_rand = (r - ur @ vr).norm()
    assert e_rand <= 1.02 * e_exact
