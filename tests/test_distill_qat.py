"""QAT modules, schedule and loss: the pieces the DF-SSM trainer is built from."""
import math

import pytest
import torch
import torch.nn.functional as F

from dfplan.distill.losses import LossConfig, distill_loss
from dfplan.distill.qat import QATBinaryLinear, QATIntNEmbedding, QATIntNLinear, fp16_round, ste
from dfplan.distill.schedule import Schedule
from dfplan.errors import DfplanError
from dfplan.formats import quant
from dfplan.formats.specs import Binary, IntN


def _w(out_f=24, in_f=40, seed=0):
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_ste_is_exact_forward_and_identity_backward():
    x = torch.randn(50, requires_grad=True)
    q = torch.round(x.detach() * 3) / 3
    y = ste(q, x)
    assert torch.equal(y, q)
    g = torch.randn(50)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("scale", ["row", "fbi"])
def test_binary_anneal_endpoints_and_gradient(scale):
    w = _w()
    m = QATBinaryLinear(w, Binary(scale, 4))
    m.anneal = 0.0
    assert torch.equal(m.weight_eff(), w)
    m.anneal = 1.0
    S, *_ = (quant.binarize_rows(w) if scale == "row" else quant.binarize_fbi(w))
    want = (quant.scaffold_rows(*quant.binarize_rows(w)) if scale == "row"
            else quant.scaffold_fbi(*quant.binarize_fbi(w)))
    assert torch.equal(m.weight_eff(), want)
    m.anneal = 0.3
    x = torch.randn(5, 40)
    g = torch.randn(5, 24)
    m(x).backward(g)
    assert torch.allclose(m.latent.grad, g.T @ x, rtol=1e-5, atol=1e-6)   # straight through


@pytest.mark.parametrize("spec", [Binary("row", 4), Binary("fbi", 3), Binary("row", 0), Binary("row", 5, 4),
                                  Binary("row", 4, init="zero")])
def test_binary_final_forward_is_the_stored_payload(spec):
    w = _w()
    m = QATBinaryLinear(w, spec, bias=torch.randn(24))
    m.begin_correction(torch.Generator().manual_seed(0))
    assert not hasattr(m, "latent") or m._parameters.get("latent") is None
    with torch.no_grad():                        # move away from the init so nothing is trivial
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    m.phase = "final"
    payload = m.payload()
    assert set(payload) == {t.name for t in spec.payload((24, 40))}
    decoded = quant.decode_weight(spec, (24, 40), payload)
    assert torch.equal(m.weight_eff(), decoded)
    # scales are fp16 in the forward already, so the stored fp16 values lose nothing
    scale = m.row_scale if spec.scale == "row" else m.col_scale
    assert not torch.equal(scale.detach(), fp16_round(scale.detach()))
    # gradients reach the scales and the factors through the integer grid
    m(torch.randn(3, 40)).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0
    if spec.rank:
        assert m.u.grad.abs().sum() > 0 and m.v.grad.abs().sum() > 0


def test_binary_correction_before_final_is_float():
    w = _w()
    m = QATBinaryLinear(w, Binary("row", 4))
    m.begin_correction()
    m.phase = "correct"
    u, v = m.factors_eff()
    assert u is m.u and v is m.v
    # svd init: the correction reduces the error of the scaffold alone
    scaffold = quant.scaffold_rows(*quant.binarize_rows(w))
    assert (m.weight_eff().detach() - w).norm() < (scaffold - w).norm()


@pytest.mark.parametrize("spec", [IntN(8), IntN(4), IntN(4, 8), IntN(3, 0, False), IntN(2)])
def test_intn_final_forward_is_the_stored_payload(spec):
    w = _w()
    m = QATIntNLinear(w, spec)
    m.phase = "correct"
    decoded = quant.decode_weight(spec, (24, 40), m.payload())
    assert torch.equal(m.weight_eff(), decoded)
    m.phase = "anneal"
    m.anneal = 0.5
    assert torch.allclose(m.weight_eff(), 0.5 * w + 0.5 * decoded, atol=1e-7)


def test_intn_embedding_forward_and_attend():
    w = _w(64, 16)
    m = QATIntNEmbedding(w, IntN(8))
    m.phase = "final"
    W = quant.decode_weight(IntN(8), (64, 16), m.payload())
    ids = torch.randint(0, 64, (2, 5))
    assert torch.equal(m(ids), F.embedding(ids, W))
    h = torch.randn(2, 5, 16)
    assert torch.allclose(m.attend(h), h @ W.T, atol=1e-6)


def test_schedule_phases_and_budget():
    s = Schedule.make(tokens=100 * 64, tokens_per_step=64, stage1_fraction=0.4, anneal_fraction=0.5,
                      final_fraction=0.25)
    assert (s.total, s.stage1, s.anneal_steps, s.final_start) == (100, 40, 20, 85)
    phases = [s.phase(i) for i in range(100)]
    assert phases.count("anneal") == 40 and phases.count("correct") == 45 and phases.count("final") == 15
    assert s.anneal(0) == pytest.approx(1 / 20) and s.anneal(19) == 1.0 and s.anneal(39) == 1.0
    assert s.lr_factor(40) < s.lr_factor(45)       # stage 2 restarts with its own warmup
    tiny = Schedule.make(tokens=1, tokens_per_step=64, stage1_fraction=0.4, anneal_fraction=0.8,
                         final_fraction=0.25)
    assert tiny.total == 2 and tiny.stage1 == 1 and tiny.final_start == 1
    with pytest.raises(DfplanError, match="token budget"):
        Schedule.make(0, 64, 0.4, 0.8, 0.25)
    with pytest.raises(DfplanError, match="final fraction"):
        Schedule.make(1000, 64, 0.4, 0.8, 0.0)


def test_loss_matches_definition():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    y = torch.randint(0, 10, (2, 3), generator=g)
    cfg = LossConfig(0.7, 0.3, 2.0)
    loss, parts = distill_loss(s, t, y, cfg, vocab_size=10)
    ls, lt = F.log_softmax(s[..., :10] / 2, -1), F.log_softmax(t[..., :10] / 2, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    ce = F.cross_entropy(s[..., :10].reshape(-1, 10), y.reshape(-1))
    assert parts["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * 4 * kl.item() + 0.3 * ce.item(), rel=1e-5)
    same, p2 = distill_loss(t, t, y, LossConfig(1.0, 0.0, 2.0))
    assert abs(p2["kl"].item()) < 1e-6 and math.isclose(same.item(), 0.0, abs_tol=1e-5)
    with pytest.raises(DfplanError):
        LossConfig(0.0, 0.0, 2.0)


def test_correction_can_start_from_another_target():
    """correction_from='teacher': U V approximate teacher - scaffold(latent), not latent - scaffold."""
    w, t = _w(seed=0), _w(seed=1)
    m = QATBinaryLinear(w, Binary("row", 24))            # full rank: the residual is reproduced
    m.begin_correction(target=t)
    m.phase = "correct"
    assert torch.allclose(m.weight_eff().detach(), t, atol=1e-4)
    assert torch.equal(m.signs.float(), quant.signs(w))  # the scaffold is still the latent's
