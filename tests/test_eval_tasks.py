"""Zero-shot tasks through lm-eval and standard-protocol perplexity (`dfplan eval --tasks`).

Everything runs offline on made-up tiny data in tmp dirs; no file of ../shared/data is read.
"""
import json
import math
import os
import random
from types import SimpleNamespace

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")   # before lm-eval / datasets are imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.harness import tasks as T
from dfplan.harness.lm import DfplanLM
from dfplan.harness.ppl import count_words, text_perplexity, windows
from dfplan.harness.run import evaluate_loaded
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.tokenizer import eos_id, save_tokenizer, train_bpe

CFG = Mamba2Config.preset("tiny").replace(vocab_size=400, chunk_size=16, n_layer=2)
WORDS = ["state", "space", "model", "mamba", "scan", "chunk", "token", "layer", "bit", "rank"]


def _text(seed, n=300):
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def bpe():
    return train_bpe([_text(0, 2000)], CFG.vocab_size)


@pytest.fixture(scope="module")
def byte_tok():
    # 256 bytes + EOS + one merge of a pair that never occurs below: one token per byte
    return train_bpe(["zq " * 50], 258)


class FixedLogits(nn.Module):
    """Same logits at every position: uniform (zeros) or one favoured token."""

    def __init__(self, vocab: int, padded: int, favour: int | None = None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, name="fixed")
        row = torch.zeros(padded)
        row[vocab:] = 50.0            # padded rows: must never count as real tokens
        if favour is not None:
            row[favour] = 10.0
        self.register_buffer("row", row)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, ids, return_cache=False):
        return self.row.expand(*ids.shape, -1).clone()


class Bigram(nn.Module):
    """Logits depend on the previous token only: after `a` the model expects `b`."""

    def __init__(self, vocab: int, padded: int, a: int, b: int):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, name="bigram")
        table = torch.zeros(padded, padded)
        table[a, b] = 10.0
        self.register_buffer("table", table)

    def forward(self, ids, return_cache=False):
        return self.table[ids]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- perplexity ------------------------------------------------------------------------

def test_uniform_model_has_perplexity_equal_to_vocab_size(byte_tok):
    V = 258
    model = FixedLogits(V, 272)
    text = "a few words of text\n\nand more " * 7
    ids = byte_tok.encode(text, add_special_tokens=False).ids
    res = text_perplexity(model, ids, eos_id(byte_tok), max_length=16, stride=5,
                          n_words=count_words(text), n_bytes=len(text.encode()), vocab_size=V)
    assert res.n_tokens == len(text.encode())            # one token per byte, every one scored
    assert math.isclose(res.token_perplexity, V, rel_tol=1e-6)
    assert math.isclose(res.byte_perplexity, V, rel_tol=1e-6)
    assert math.isclose(res.bits_per_byte, math.log2(V), rel_tol=1e-6)
    assert math.isclose(res.word_perplexity, V ** (res.n_tokens / res.n_words), rel_tol=1e-6)


def test_windows_score_every_token_once_with_enough_context():
    for n, L, s in [(1, 8, 3), (7, 8, 8), (50, 8, 3), (64, 16, 16), (65, 16, 1)]:
        seen = []
        for start, end, k in windows(n, L, s):
            assert end - start <= L and k <= end - start
            seen += list(range(end - k + 1, end + 1))      # target stream positions
            if start > 0:
                assert end - start == L                    # full context after the first window
        assert seen == list(range(1, n + 1))


def test_lm_eval_rolling_path_agrees_with_our_perplexity(tmp_path, bpe):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model = build_model(CFG, seed=0).eval()
    lm = DfplanLM(model=model, tokenizer=bpe, max_length=24, stride=7, batch_size=3)
    text = _text(1, 60) + "\n\n" + _text(2, 40)
    ids = lm.tok_encode(text)
    ours = text_perplexity(model, ids, lm.prefix_token_id, 24, 7, n_words=count_words(text),
                           n_bytes=len(text.encode()), batch_size=2, vocab_size=CFG.vocab_size)
    assert ours.n_windows > 3
    (ll,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    assert math.isclose(-ll, ours.nll_sum, rel_tol=1e-5)

    # the same document as an lm-eval task: lm-eval's own word/byte perplexity maths
    data = _write_jsonl(tmp_path / "doc.jsonl", [{"text": text}])
    import yaml
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_ppl.yaml").write_text(
        yaml.safe_dump(T.text_perplexity_yaml("tiny_ppl", data, tmp_path / "hf")))
    out = simple_evaluate(model=lm, tasks=["tiny_ppl"], log_samples=False,
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    r = out["results"]["tiny_ppl"]
    assert math.isclose(r["word_perplexity,none"], ours.word_perplexity, rel_tol=1e-5)
    assert math.isclose(r["byte_perplexity,none"], ours.byte_perplexity, rel_tol=1e-5)
    assert math.isclose(r["bits_per_byte,none"], ours.bits_per_byte, rel_tol=1e-5)


# --- zero-shot tasks -------------------------------------------------------------------

def _resolved(data_dir, *names):
    return T.resolve(list(names), data_dir)


def test_multiple_choice_accuracy_of_a_model_that_always_says_mamba(tmp_path, bpe):
    mamba = bpe.encode(" mamba", add_special_tokens=False).ids
    assert len(mamba) == 1
    model = FixedLogits(CFG.vocab_size, CFG.vocab_padded, favour=mamba[0])
    lm = DfplanLM(model=model, tokenizer=bpe, max_length=64)
    # the favoured choice is gold in 3 of 5 examples: accuracy 3/5, whatever the order
    rows = [{"query": "Question: state space", "choices": ["mamba mamba", "scan chunk"], "gold": 0},
            {"query": "Question: bit", "choices": ["layer", "mamba", "token"], "gold": 1},
            {"query": "Question: rank", "choices": ["scan", "mamba"], "gold": 0},
            {"query": "Question: chunk", "choices": ["token bit", "mamba"], "gold": 0},
            {"query": "Question: layer", "choices": ["bit", "rank", "mamba mamba mamba"], "gold": 2}]
    _write_jsonl(tmp_path / "llm_foundry_gauntlet" / "arc_easy.jsonl", rows)
    res = evaluate_loaded(lm, _resolved(tmp_path, "arc_easy"), progress=False)
    row = res["tasks"]["arc_easy"]
    assert row["acc"] == pytest.approx(0.6)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 4))   # sample stderr, n-1
    assert row["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 3) / 5)
    assert res["lm_eval"]["results"]["dfplan_arc_easy"]["acc,none"] == pytest.approx(0.6)


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes(tmp_path, byte_tok):
    # uniform model + one token per byte: ll(choice) = -(bytes + 1 delimiter) * ln V
    lm = DfplanLM(model=FixedLogits(258, 272), tokenizer=byte_tok, max_length=128)
    rows = [{"query": "Q", "choices": ["\u00e9\u00e9\u00e9", "abcd"], "gold": 0},   # 3 chars/6 bytes vs 4/4
            {"query": "Q", "choices": ["ab", "abcdefgh"], "gold": 1}]
    # doc 1: acc -> "abcd" (5 < 7 tokens); per char -7/3 < -5/4 -> "abcd"; per byte -7/6 > -5/4 -> "ééé"
    # doc 2: acc -> "ab"; per char and per byte -9/8 > -3/2 -> "abcdefgh"
    _write_jsonl(tmp_path / "piqa.jsonl", rows)
    row = evaluate_loaded(lm, _resolved(tmp_path, "piqa"), progress=False)["tasks"]["piqa"]
    assert (row["acc"], row["acc_norm"], row["acc_bytes"]) == (0.0, 0.5, 1.0)


def test_winogrande_partial_scoring_and_lambada(tmp_path, bpe):
    enc = lambda w: bpe.encode(w, add_special_tokens=False).ids
    (scan,), (mamba,) = enc(" scan"), enc(" mamba")
    lm = DfplanLM(model=Bigram(CFG.vocab_size, CFG.vocab_padded, scan, mamba), tokenizer=bpe, max_length=64)
    # the shared continuation " mamba" is scored after each context option; only the option
    # ending in " scan" makes it likely, so the model answers option 1 every time
    _write_jsonl(tmp_path / "winogrande.jsonl",
                 [{"context_options": ["state bit", "state scan"], "continuation": "mamba", "gold": g}
                  for g in (1, 1, 0, 1)])
    _write_jsonl(tmp_path / "lambada_openai.jsonl",
                 [{"context": c, "continuation": "mamba"} for c in ("state scan", "bit scan", "scan bit", "rank")])
    res = evaluate_loaded(lm, _resolved(tmp_path, "winogrande", "lambada"), progress=False)
    assert res["tasks"]["winogrande"]["acc"] == pytest.approx(0.75)
    assert res["tasks"]["lambada"]["acc"] == pytest.approx(0.5)        # greedy " mamba" after " scan" only
    p_hit = math.exp(10) / (math.exp(10) + CFG.vocab_size - 1)            # softmax over the real vocabulary
    want_ppl = math.exp(-(2 * math.log(p_hit) + 2 * math.log(1 / CFG.vocab_size)) / 4)
    assert res["tasks"]["lambada"]["perplexity"] == pytest.approx(want_ppl, rel=1e-4)


def test_generate_until_matches_the_models_greedy_decode(bpe):
    model = build_model(CFG, seed=3).eval()
    lm = DfplanLM(model=model, tokenizer=bpe, max_length=64)
    prompt = "state space model"
    ids = torch.tensor([lm.tok_encode(prompt)])
    ref = model.generate(ids, 8)[0, ids.shape[1]:].tolist()
    eos = lm.eot_token_id
    ref = ref[:ref.index(eos)] if eos in ref else ref
    want = bpe.decode(ref)
    (got,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": ["\x00"], "max_gen_toks": 8}))],
                               disable_tqdm=True)
    assert got == want
    if len(want) > 2:
        stop = want[1:3]
        (cut,) = lm.generate_until([SimpleNamespace(args=(prompt, {"until": [stop], "max_gen_toks": 8}))],
                                   disable_tqdm=True)
        assert cut == want.split(stop)[0]


def test_dfplan_is_registered_with_lm_eval():
    from lm_eval.api.registry import get_model
    assert get_model("dfplan") is DfplanLM


# --- the command line, and bad input ---------------------------------------------------

@pytest.fixture
def saved(tmp_path, bpe):
    model = build_model(CFG, seed=0).eval()
    save_mamba_ssm(model, tmp_path / "teacher", tokenizer=bpe)
    dd = tmp_path / "data"
    _write_jsonl(dd / "llm_foundry_gauntlet" / "piqa.jsonl",
                 [{"query": "Question: state?\n", "choices": ["mamba scan", "bit"], "gold": i % 2}
                  for i in range(4)])
    rows = [_text(i, 30) + " \n" if i % 3 else "" for i in range(12)]
    _write_jsonl(dd / "wikitext-2-raw-v1" / "test.rows.jsonl", rows)
    return tmp_path, dd


def test_eval_tasks_cli_writes_one_json_with_teacher_and_packed_bytes(saved, bpe, capsys):
    from dfplan.formats.apply import apply_plan
    from dfplan.formats.layouts import layout_plan
    from dfplan.packed import save_packed

    tmp, dd = saved
    plan = layout_plan("dfssm", CFG)
    student = apply_plan(build_model(CFG, seed=0).eval(), plan)
    save_packed(student, plan, tmp / "student", tokenizer=bpe)
    out = tmp / "eval.json"
    assert main(["eval", "--model", str(tmp / "student"), "--tasks", "wikitext2,piqa", "--data-dir", str(dd),
                 "--max-length", "32", "--stride", "8", "--compare", str(tmp / "teacher"),
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m, t = res["model"], res["teacher"]
    manifest = json.loads((tmp / "student" / "manifest.json").read_text())
    assert m["model"]["plan_hash"] == manifest["plan_hash"] == plan.hash()
    assert m["model"]["payload_bytes"] == manifest["payload_bytes"]
    assert t["model"]["kind"] == "checkpoint" and t["model"]["plan_hash"] is None
    for r in (m, t):
        p = r["perplexity"]["wikitext2"]
        assert p["n_bytes"] == len("\n\n".join(json.loads(x) for x in
                                               (dd / "wikitext-2-raw-v1/test.rows.jsonl").read_text().splitlines()).encode())
        assert p["stride"] == 8 and p["max_length"] == 32 and p["token_perplexity"] > 1
        assert set(r["tasks"]["piqa"]) >= {"acc", "acc_stderr", "acc_norm", "chance"}
        assert "dfplan_piqa" in r["lm_eval"]["results"]
    assert m["perplexity"]["wikitext2"]["nll_sum"] != t["perplexity"]["wikitext2"]["nll_sum"]
    assert "teacher" in capsys.readouterr().out


def test_eval_without_tasks_keeps_heldout_perplexity(saved, tmp_path):
    tmp, _ = saved
    held = tmp_path / "held.txt"
    held.write_text(_text(5, 400))
    out = tmp_path / "ho.json"
    assert main(["eval", "--model", str(tmp / "teacher"), "--corpus", str(held), "--seq-len", "16",
                 "--windows", "3", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n_windows"] == 3


def test_unknown_task_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(DfplanError) as e:
        T.resolve(["piqa", "mmlu_pro"], tmp_path)
    msg = str(e.value)
    assert "mmlu_pro" in msg and all(k in msg for k in ("wikitext2", "ptb", "hellaswag", "winogrande", "boolq"))
    assert main(["eval", "--model", str(tmp_path), "--tasks", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("line, expect", [
    ("not json", "not JSON"),
    ('{"query": "q", "choices": ["a", "b"]}', "'gold' as int"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "gold 2 is not an index"),
    ('["q", ["a", "b"], 0]', "expected a JSON object"),
])
def test_malformed_data_file_names_file_and_line(tmp_path, line, expect):
    good = json.dumps({"query": "q", "choices": ["a", "b"], "gold": 0})
    f = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    f.parent.mkdir()
    f.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DfplanError) as e:
        T.resolve(["hellaswag"], tmp_path)
    assert f"{f}:3" in str(e.value) and expect in str(e.value)


def test_wikitext_rows_must_be_json_strings(saved, tmp_path):
    tmp, dd = saved
    f = dd / "wikitext-2-raw-v1" / "test.rows.jsonl"
    f.write_text('"a"\n"b"\n{"text": "c"}\n')
    assert main(["eval", "--model", str(tmp / "teacher"), "--tasks", "wikitext2", "--data-dir", str(dd)]) == 2


def test_missing_tokenizer_and_too_long_context_are_clear_errors(tmp_path, capsys, bpe):
    model = build_model(CFG, seed=0).eval()
    save_mamba_ssm(model, tmp_path / "notok")
    with pytest.raises(DfplanError, match="no tokenizer.json"):
        DfplanLM(pretrained=str(tmp_path / "notok"))
    save_mamba_ssm(model, tmp_path / "m", tokenizer=bpe)
    (tmp_path / "m" / "zoo.json").write_text(json.dumps({"seq_len": 32}))
    with pytest.raises(DfplanError, match="context length 64 is above the model's.*32"):
        DfplanLM(pretrained=str(tmp_path / "m"), max_length=64)
    assert DfplanLM(pretrained=str(tmp_path / "m")).max_length == 32      # the trained context by default
    save_tokenizer(bpe, tmp_path / "notok")
    assert DfplanLM(pretrained=str(tmp_path / "notok")).max_length == 2048


def test_task_without_local_file_needs_the_hub_or_names_where_it_looked(tmp_path):
    (r,) = T.resolve(["arc_challenge"], tmp_path)
    assert r.path is None and r.lm_eval_name == "arc_challenge"
    with pytest.raises(DfplanError, match="ptb.test.txt"):
        T.resolve(["ptb"], tmp_path)
