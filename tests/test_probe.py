"""Knowledge probe: metrics on planted and random states, a model with the answer planted
at a known block, phases, one-block swaps, prompt conversion, CLI files and bad input."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dfplan.cli import main
from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.apply import apply_plan
from dfplan.formats.layouts import layout_plan
from dfplan.loading import save_mamba_ssm
from dfplan.model import build_model
from dfplan.packed import save_packed
from dfplan.probe.collect import read_model, read_swaps
from dfplan.probe.metrics import category_separation, first_entry, layer_table, nearest_centroid_accuracy
from dfplan.probe.phases import detect_phases, disturbance
from dfplan.probe.prompts import DFSSM_LAYOUT, convert_rome, dfssm_layout, encode, load_prompts
from dfplan.tokenizer import train_bpe

CFG = Mamba2Config(d_model=64, n_layer=4, vocab_size=300, d_state=16, headdim=16, chunk_size=16, name="probe")
PLANT = 2                 # the block that writes the answer
SUBJECTS = list(range(10, 26))


def answer_of(s: int) -> int:
    return 100 + (s - 10) * 3


# ------------------------------------------------------------------ metrics
def test_separation_equals_brute_force_pairwise():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    u = x - x.mean(0)
    u = u / u.norm(dim=1, keepdim=True)
    d = 1 - u @ u.T
    same, off = y[:, None] == y[None], ~torch.eye(30, dtype=torch.bool)
    want = d[~same].mean() - d[same & off].mean()
    assert category_separation(x, y) == pytest.approx(float(want), abs=1e-9)


def test_category_accuracy_is_chance_for_random_states():
    g = torch.Generator().manual_seed(0)
    C, N = 4, 800
    x, y = torch.randn(N, 32, generator=g), torch.arange(N) % C
    assert abs(nearest_centroid_accuracy(x, y, folds=5) - 1 / C) < 0.06
    assert abs(category_separation(x, y)) < 0.01


def test_category_accuracy_and_separation_see_planted_categories():
    g = torch.Generator().manual_seed(0)
    C, N = 4, 200
    y = torch.arange(N) % C
    means = torch.randn(C, 32, generator=g) * 2
    x = means[y] + torch.randn(N, 32, generator=g)
    assert nearest_centroid_accuracy(x, y) > 0.95
    assert category_separation(x, y) > 0.3


def test_first_entry():
    rank = torch.tensor([[5, 0, 9], [2, 0, 9], [0, 3, 9]])      # (S=3, N=3)
    assert first_entry(rank, 1).tolist() == [2, 0, -1]
    assert first_entry(rank, 3).tolist() == [1, 0, -1]


# ------------------------------------------------------------------ a model with a planted fact
class PlantMixer(nn.Module):
    """Maps the (normed) embedding of a subject token to a large multiple of its answer's
    embedding: block PLANT writes the answer into the residual stream."""

    def __init__(self, model, scale=30.0):
        super().__init__()
        E = model.backbone.embedding.weight.detach()
        n = model.backbone.layers[PLANT].norm(E[SUBJECTS])                   # (16, d), what the mixer sees
        a = E[[answer_of(s) for s in SUBJECTS]]                              # (16, d)
        self.register_buffer("P", torch.linalg.lstsq(n, a).solution * scale)   # n @ P = a * scale

    def forward(self, u, cache=None):
        return u @ self.P


def planted_model():
    torch.manual_seed(0)
    m = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        for blk in m.backbone.layers:                   # blocks write nothing: identity on the stream
            blk.mixer.out_proj.weight.zero_()
        m.backbone.layers[PLANT].mixer = PlantMixer(m)
    return m


def planted_prompts(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, answers = [], []
    for i in range(n):
        s = SUBJECTS[i % len(SUBJECTS)]
        filler = torch.randint(30, 90, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        ids.append(filler + [s])
        answers.append(answer_of(s))
    return ids, answers


def test_residual_stream_ends_in_forward_logits(tiny_model):
    ids = torch.randint(0, 4000, (2, 21))
    with torch.no_grad():
        states = list(tiny_model.residual_stream(ids))
        assert len(states) == tiny_model.config.n_layer + 1
        assert torch.equal(tiny_model.head(states[-1], None), tiny_model(ids))


def test_probe_finds_the_block_that_plants_the_answer():
    m = planted_model()
    ids, answers = planted_prompts()
    rd = read_model(m, ids, answers, CFG.vocab_size, batch_size=8)
    # depth PLANT + 1 is the stream after block PLANT; before it no answer is the top token
    assert first_entry(rd.rank, 1).tolist() == [PLANT + 1] * len(ids)
    labels = torch.tensor([s % 2 for s in (x[-1] for x in ids)])
    rows = layer_table(rd.states, rd.rank, rd.logprob, labels, k=1, folds=4)
    assert [r["layer"] for r in rows if r["first_top1"]] == [PLANT]
    assert rows[PLANT + 1]["top1_rate"] == 1.0 and rows[PLANT]["top1_rate"] == 0.0
    ph = detect_phases([r["category_accuracy"] for r in rows[1:]], [r["top1_rate"] for r in rows[1:]], 0.5)
    assert ph.recall == (PLANT, PLANT) and ph.formatting == (PLANT + 1, CFG.n_layer - 1)


def test_padding_does_not_change_the_last_token_readout():
    m = planted_model()
    ids, answers = planted_prompts(6)
    alone = read_model(m, ids, answers, CFG.vocab_size, batch_size=1)
    batched = read_model(m, ids, answers, CFG.vocab_size, batch_size=6)
    torch.testing.assert_close(alone.states, batched.states, rtol=1e-4, atol=1e-5)
    assert torch.equal(alone.rank, batched.rank)


def test_noncausal_attention_hybrid_is_batched_without_padding():
    hybrid = Mamba2Config(d_model=64, n_layer=2, vocab_size=300, d_state=16, headdim=16, chunk_size=16,
                          attn_layer_idx=(1,), attn_cfg={"num_heads": 4}, name="hybrid")   # causal=False
    m = build_model(hybrid, seed=0).eval()
    ids, answers = planted_prompts(6)
    alone = read_model(m, ids, answers, hybrid.vocab_size, batch_size=1)
    batched = read_model(m, ids, answers, hybrid.vocab_size, batch_size=6)
    torch.testing.assert_close(alone.states, batched.states, rtol=1e-4, atol=1e-5)


def test_swap_is_exact_for_an_identical_student_and_blames_the_planting_block():
    teacher = planted_model()
    ids, answers = planted_prompts(16)
    same = read_swaps(teacher, planted_model(), ids, answers, CFG.vocab_size, batch_size=8)
    torch.testing.assert_close(same.logprob, same.base_logprob.expand_as(same.logprob), rtol=0, atol=1e-5)
    broken = planted_model()
    broken.backbone.layers[PLANT].mixer = build_model(CFG, seed=1).backbone.layers[PLANT].mixer
    with torch.no_grad():
        broken.backbone.layers[PLANT].mixer.out_proj.weight.zero_()       # block PLANT forgets the fact
    sw = read_swaps(teacher, broken, ids, answers, CFG.vocab_size, batch_size=8)
    drop = (sw.base_logprob[None] - sw.logprob).mean(1).tolist()
    ph = detect_phases([0.5] * 4, [0, 0, 1, 1], 0.5)
    top = disturbance(drop, sw.kl.mean(1).tolist(), ph)
    assert top[0]["block"] == PLANT and top[0]["phase"] == "recall" and top[0]["logprob_drop"] > 1.0
    assert max(abs(d) for i, d in enumerate(drop) if i != PLANT) < 1e-4


# ------------------------------------------------------------------ phases
def test_phases_from_curves():
    acc = [0.30, 0.60, 0.90, 0.95, 0.95, 0.95, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    rec = [0, 0, 0, 0, 0, 0.1, 0.5, 0.95, 1, 1, 1, 1]
    ph = detect_phases(acc, rec, chance=0.25)
    assert ph.categorisation == (0, 2) and ph.recall == (5, 7) and ph.formatting == (8, 11)
    none = detect_phases([0.26] * 6, [0.0, 0.01, 0.0, 0.02, 0.0, 0.01], chance=0.25)
    assert none.recall is none.formatting is none.categorisation is None
    assert any("no recall phase" in n for n in none.notes)


# ------------------------------------------------------------------ prompts
def rome_records(per_relation=60):
    recs = []
    for _, rel, _ in DFSSM_LAYOUT:
        for j in range(per_relation):
            recs.append({"known_id": len(recs), "subject": f"S{j}", "attribute": f"A{j % 7}",
                         "prompt": f"S{j} has {rel} of", "relation_id": rel, "template": "{} x"})
    return recs


def test_rome_conversion_and_dfssm_layout(tmp_path):
    recs = rome_records()
    ps = convert_rome(recs)
    assert len(ps) == len(recs) and {p.category for p in ps} >= {"capital", "continent"}
    assert ps[0].answer == "A0" and ps[0].meta["relation"] == "P36"
    f = tmp_path / "known.json"
    f.write_text(json.dumps(recs))
    s445 = load_prompts(f, layout="dfssm445")
    assert len(s445) == 445 and len({p.category for p in s445}) == 19
    assert sum(p.category == "capitals" for p in s445) == 49
    assert all(p.meta["relation"] == "P36" for p in s445 if p.category == "capitals")
    with pytest.raises(DfplanError, match="needs 49 prompts of relation P36"):
        dfssm_layout(convert_rome(rome_records(per_relation=10)))


@pytest.mark.parametrize("line, match", [
    ({"prompt": "The capital of France is", "category": "capital"}, "missing answer"),
    ({"prompt": "The capital of France is", "answer": "Paris"}, "missing category"),
    ({"prompt": "The capital of France is", "answer": "  ", "category": "capital"}, "answer must be a non-empty"),
])
def test_bad_prompt_lines_name_the_line(tmp_path, line, match):
    f = tmp_path / "p.jsonl"
    good = {"prompt": "Rome is in", "answer": "Italy", "category": "country"}
    f.write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DfplanError, match=f"p.jsonl:2: {match}"):
        load_prompts(f)


def test_other_bad_prompt_files(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "answer": "b", "category": "c"}\n{not json\n')
    with pytest.raises(DfplanError, match="p.jsonl:2: not valid JSON"):
        load_prompts(f)
    f.write_text('{"prompt": "a", "answer": "b", "category": "c"}\n')
    with pytest.raises(DfplanError, match="at least two"):
        load_prompts(f)
    with pytest.raises(DfplanError, match="does not exist"):
        load_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "k.json").write_text('[{"subject": "x", "prompt": "x is"}]')
    with pytest.raises(DfplanError, match="ROME"):
        load_prompts(tmp_path / "k.json")


def test_answers_that_tokenize_to_nothing_are_refused(tmp_path):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1, "capital": 2, "is": 3, "paris": 4}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex("[^\\x00-\\x7f]"), ""), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "the capital is", "answer": "Paris", "category": "a"},
        {"prompt": "the capital is", "answer": "東京", "category": "b"})))
    ps = load_prompts(f)
    ids, answers = encode(ps[:1], tok, 16)
    assert ids == [[1, 2, 3]] and answers == [4]
    with pytest.raises(DfplanError, match="prompt 1: answer '東京' tokenizes to nothing"):
        encode(ps, tok, 16)
    with pytest.raises(DfplanError, match="vocab is 4"):
        encode(ps[:1], tok, 4)


# ------------------------------------------------------------------ CLI end to end
WORDS = ["Paris", "France", "Rome", "Italy", "Berlin", "Germany", "capital", "of", "is", "the",
         "language", "French", "Italian", "German", "spoken", "in", "Europe", "continent"]


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (30,), generator=g)) for _ in range(40)]
    tok = train_bpe(texts, CFG.vocab_size)
    teacher = build_model(CFG, seed=0).eval()
    save_mamba_ssm(teacher, d / "teacher", tokenizer=tok)
    student = build_model(CFG, seed=0).eval()
    with torch.no_grad():
        for p in student.backbone.layers[1].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_mamba_ssm(student, d / "student", tokenizer=tok)
    plan = layout_plan("dfssm", CFG)
    packed = apply_plan(build_model(CFG, seed=0).eval(), plan, generator=torch.Generator().manual_seed(0))
    save_packed(packed, plan, d / "packed", tokenizer=tok)
    rows = [("The capital of France is", "Paris", "capital"), ("The capital of Italy is", "Rome", "capital"),
            ("The capital of Germany is", "Berlin", "capital"), ("In France the language spoken is", "French", "language"),
            ("In Italy the language spoken is", "Italian", "language"),
            ("In Germany the language spoken is", "German", "language"),
            ("France is in the continent of", "Europe", "continent"), ("Italy is in the continent of", "Europe", "continent")]
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a, "category": c}) + "\n" for p, a, c in rows))
    return d


def test_cli_writes_tables_and_figure(saved_pair, capsys):
    d = saved_pair
    out = d / "run"
    rc = main(["probe", "--model", str(d / "teacher"), "--compare", str(d / "student"), "--prompts",
               str(d / "p.jsonl"), "--out", str(out), "--folds", "2", "--top-k", "5"])
    assert rc == 0, capsys.readouterr().err
    for f in ("probe.json", "probe_layers.csv", "probe_swap.csv", "probe_prompts.csv", "probe_prompts.jsonl",
              "probe.png", "probe.md"):
        assert (out / f).stat().st_size > 0, f
    s = json.loads((out / "probe.json").read_text())
    assert [m["name"] for m in s["models"]] == ["teacher", "student"] and s["prompts"]["n"] == 8
    import pandas as pd
    layers = pd.read_csv(out / "probe_layers.csv")
    assert len(layers) == 2 * (CFG.n_layer + 1) and layers["layer"].min() == -1
    swap = pd.read_csv(out / "probe_swap.csv")
    # only block 1 differs between student and teacher: no other block moves the output
    assert swap.loc[swap.block != 1, "kl"].abs().max() < 1e-6 < swap.loc[swap.block == 1, "kl"].iloc[0]
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_compares_a_packed_student(saved_pair, capsys):
    d = saved_pair
    out = d / "run-packed"
    rc = main(["probe", "--model", str(d / "teacher"), "--compare", str(d / "packed"), "--prompts",
               str(d / "p.jsonl"), "--out", str(out), "--folds", "2"])
    assert rc == 0, capsys.readouterr().err
    import pandas as pd
    swap = pd.read_csv(out / "probe_swap.csv")
    assert len(swap) == CFG.n_layer and (swap["kl"] > 0).all()     # every block is 1-bit: each one moves it
    student = pd.read_csv(out / "probe_layers.csv").query("model == 'student'")
    assert (student["cos_to_teacher"] < 1).all()


def test_cli_bad_input_is_one_line_and_writes_nothing(saved_pair, tmp_path, capsys):
    d = saved_pair
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "The capital of France is", "category": "capital"}\n')
    out = tmp_path / "run"
    rc = main(["probe", "--model", str(d / "teacher"), "--prompts", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "missing answer" in err and err.count("\n") == 1
    assert not out.exists()
    rc = main(["probe", "--prompts", str(d / "p.jsonl")])
    assert rc == 2 and "needs --model" in capsys.readouterr().err


def test_cli_write_prompts_converts_rome(tmp_path, capsys):
    f = tmp_path / "known.json"
    f.write_text(json.dumps(rome_records()))
    rc = main(["probe", "--prompts", str(f), "--layout", "dfssm445", "--write-prompts", str(tmp_path / "s.jsonl")])
    assert rc == 0
    lines = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(lines) == 445 and {"prompt", "answer", "category", "relation"} <= set(lines[0])


def test_report_renders_the_probe(saved_pair, capsys):
    """`dfplan report` on a run folder holding a probe output: its table rows are the CSV's, its
    figure is a real, non-blank PNG, and every probe file is named in the report."""
    import shutil

    import numpy as np
    import pandas as pd
    from matplotlib import image

    from dfplan.reports import render_report
    from dfplan.reports.check import check_report

    d = saved_pair
    run = d / "run-report"
    assert main(["probe", "--model", str(d / "teacher"), "--compare", str(d / "student"), "--prompts",
                 str(d / "p.jsonl"), "--out", str(run / "probe"), "--folds", "2"]) == 0, capsys.readouterr().err
    (run / "run.json").write_text(json.dumps({"model": str(d / "teacher"), "fingerprint": "f" * 64, "commands": {}}))
    rep = render_report(run)
    text = rep.path.read_text()
    section = text.split("## Knowledge probe", 1)[1].split("\n## ", 1)[0]
    layers = pd.read_csv(run / "probe" / "probe_layers.csv")
    rows = [line.split("|")[1:-1] for line in section.splitlines()
            if line.startswith("| teacher ") or line.startswith("| student ")]
    table = [[c.strip() for c in r] for r in rows if len(r) == 7 and r[1].strip().lstrip("-").isdigit()]
    assert len(table) == len(layers)
    for (model, layer, _, acc, *_rest), (_, want) in zip(table, layers.iterrows()):
        assert model == want["model"] and int(layer) == want["layer"]
        assert float(acc) == pytest.approx(want["category_accuracy"], abs=6e-4)
    png = [p for p in rep.figures if "probe" in str(p)]
    assert png
    pixels = image.imread(rep.path.parent / "report_figures" / Path(png[0]).name)
    assert float(np.std(pixels)) > 0.05
    assert check_report(run) == []
    shutil.rmtree(run)
