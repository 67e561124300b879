"""DF-SSM distillation end to end on a tiny model: it learns, it resumes exactly, it exports
exactly what it trained, and it stops cleanly on divergence."""
import copy

import numpy as np
import pytest
import torch

from dfplan.config import Mamba2Config
from dfplan.data import gather, split_windows
from dfplan.distill.export import check_export, export_student, to_inference
from dfplan.distill.losses import LossConfig
from dfplan.distill.qat import QATBinaryLinear, qat_modules
from dfplan.distill.trainer import DistillConfig, train
from dfplan.errors import DfplanError
from dfplan.evaluate import kl_to_teacher
from dfplan.formats.apply import apply_plan
from dfplan.formats.layouts import layout_plan
from dfplan.formats.specs import Binary, IntN
from dfplan.model import build_model
from dfplan.packed import load_packed

SEQ = 32


def tiny_cfg() -> Mamba2Config:
    return Mamba2Config.preset("tiny").replace(d_model=64, n_layer=2, vocab_size=300, d_state=16,
                                               headdim=16, chunk_size=16)


def make_teacher(cfg=None):
    cfg = cfg or tiny_cfg()
    m = build_model(cfg, seed=0).eval()
    with torch.no_grad():     # peaked next-token distributions, so KL differences are visible
        m.backbone.embedding.weight.mul_(25)
    return m


def make_plan(cfg, rank=4):
    p = layout_plan("dfssm", cfg)
    return p.with_(specs={k: (Binary(v.scale, rank) if isinstance(v, Binary) else v)
                          for k, v in p.specs.items()})


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_cfg()
    teacher = make_teacher(cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 12000).astype(np.uint16)
    split = split_windows(len(tokens), SEQ, 0.1, 0)
    return cfg, teacher, make_plan(cfg), tokens, split


def dcfg(steps, **kw):
    # KL only: the tokens are random, so cross-entropy on them would teach noise
    base = dict(loss=LossConfig(1.0, 0.0, 2.0), tokens=steps * 4 * SEQ, seq_len=SEQ, batch_size=4, stage1_fraction=0.4, anneal_fraction=0.5,
                final_fraction=0.4, lr_latent=2e-3, lr_correction=5e-3, lr_scale=1e-3, warmup=2,
                checkpoint_every=2, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def quiet(_msg):
    pass


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    cfg, teacher, plan, tokens, split = setup
    ck = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    res = train(teacher, plan, tokens, split, dcfg(24), checkpoint=ck, progress=False, say=quiet)
    return res


def test_distillation_lowers_kl(setup, trained):
    cfg, teacher, plan, tokens, split = setup
    assert trained.finished and trained.state["step"] == 24
    windows = gather(tokens, split.valid[:16], SEQ + 1)
    ptq = apply_plan(copy.deepcopy(teacher), plan, generator=torch.Generator().manual_seed(0))
    kl_before = kl_to_teacher(teacher, ptq, windows, 8, cfg.vocab_size)
    kl_after = kl_to_teacher(teacher, trained.student, windows, 8, cfg.vocab_size)
    assert kl_after < 0.9 * kl_before, (kl_before, kl_after)
    # stage 2 starts near the untrained plan's KL and goes down
    h = trained.state["history"]
    stage2 = [r for r in h if r["phase"] != "anneal"]
    assert stage2[-1]["kl"] < stage2[0]["kl"]
    assert [r["phase"] for r in h][-1] == "final"


def test_export_equals_trained_model(setup, trained, tmp_path):
    cfg, teacher, plan, tokens, split = setup
    batch = torch.from_numpy(gather(tokens, split.valid[:3], SEQ + 1)[:, :-1])
    out, check = export_student(trained.student, plan, tmp_path / "student", batch)
    assert check.exact and check.max_abs_ref <= 1e-5 * 50
    assert (out / "manifest.json").is_file()
    # independent of check_export: the reloaded artifact's weights are the student's forward weights
    loaded = load_packed(out)
    for name, m in qat_modules(trained.student):
        packed_mod = loaded.get_submodule(name)
        assert torch.equal(packed_mod.dequantize(), m.weight_eff().detach()), name
    # and the held-out logits agree on the reference kernel path
    fresh = torch.from_numpy(gather(tokens, split.valid[5:7], SEQ + 1)[:, :-1])
    again = check_export(trained.student, out, fresh)
    assert again.exact


def test_export_refuses_a_mismatch(setup, trained, tmp_path):
    """The check catches a student that differs from its artifact (and leaves no manifest)."""
    cfg, teacher, plan, tokens, split = setup
    student = copy.deepcopy(trained.student)
    batch = torch.from_numpy(gather(tokens, split.valid[:2], SEQ + 1)[:, :-1])
    model = to_inference(student, plan)
    from dfplan.packed import save_packed
    save_packed(model, plan, tmp_path / "a")
    with torch.no_grad():
        next(m for _, m in qat_modules(student) if isinstance(m, QATBinaryLinear)).u.mul_(3)
    assert not check_export(student, tmp_path / "a", batch).exact


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_killed_and_resumed_run_ends_with_identical_weights(setup, tmp_path):
    """Killed in stage 1, resumed across the stage boundary, killed again in stage 2 and
    resumed to the end: the same weights as an uninterrupted run, bit for bit."""
    cfg, teacher, plan, tokens, split = setup
    c = dcfg(10)                                    # stage 1 = steps 0..3, checkpoints every 2
    assert c.schedule().stage1 == 4
    full = train(teacher, plan, tokens, split, c, checkpoint=None, progress=False, say=quiet)
    ck = tmp_path / "checkpoint.pt"
    first = train(teacher, plan, tokens, split, c, checkpoint=ck, stop_after=3, progress=False, say=quiet)
    assert not first.finished and first.state["step"] == 3          # killed; checkpoint at step 2
    second = train(teacher, plan, tokens, split, c, checkpoint=ck, resume=True, stop_after=5,
                   progress=False, say=quiet)
    assert second.state["step"] == 7                                 # killed; checkpoint at step 6
    assert torch.load(ck, weights_only=True)["stage"] == 2
    third = train(teacher, plan, tokens, split, c, checkpoint=ck, resume=True, progress=False, say=quiet)
    assert third.finished and third.state["tokens_seen"] == full.state["tokens_seen"]
    a, b = _state(full.student), _state(third.student)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_other_options(setup, tmp_path):
    cfg, teacher, plan, tokens, split = setup
    ck = tmp_path / "checkpoint.pt"
    train(teacher, plan, tokens, split, dcfg(6), checkpoint=ck, stop_after=3, progress=False, say=quiet)
    with pytest.raises(DfplanError, match="different"):
        train(teacher, plan, tokens, split, dcfg(6, lr_correction=1e-2), checkpoint=ck, resume=True,
              progress=False, say=quiet)


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    cfg, teacher, plan, tokens, split = setup
    ck = tmp_path / "checkpoint.pt"

    def poison(step, student):
        if step == 4:
            with torch.no_grad():
                next(m for _, m in qat_modules(student)).latent.fill_(float("nan"))

    with pytest.raises(DfplanError, match=r"diverged at step 4.*checkpoint.*step 4\) is kept"):
        train(teacher, plan, tokens, split, dcfg(10), checkpoint=ck, on_step=poison, progress=False, say=quiet)
    good = torch.load(ck, weights_only=True)
    assert good["step"] == 4
    assert all(torch.isfinite(v).all() for v in good["model"].values() if v.is_floating_point())


def test_intn_only_plan_and_trained_norms(setup, tmp_path):
    """A plan without binary units (IntN linears) and --train-norms: norms move, then freeze
    onto the fp16 grid, and the export is still exact."""
    cfg, teacher, _, tokens, split = setup
    from dfplan.formats.plan import Plan, model_signature
    plan = Plan(specs={"*.in_proj": IntN(4), "*.out_proj": IntN(8, 16)}, model=model_signature(cfg))
    res = train(teacher, plan, tokens, split, dcfg(6, train_norms=True, lr_norm=1e-2), progress=False,
                say=quiet)
    w0 = teacher.backbone.layers[0].norm.weight
    w1 = res.student.backbone.layers[0].norm.weight
    assert not torch.equal(w0, w1) and torch.equal(w1, w1.half().float())
    batch = torch.from_numpy(gather(tokens, split.valid[:2], SEQ + 1)[:, :-1])
    _, check = export_student(res.student, plan, tmp_path / "s", batch)
    assert check.exact
