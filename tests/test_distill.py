import math

import pytest
import torch

from flwr_fedgkt.distill import ce_kd_loss, kd_loss


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def test_kd_loss_matches_a_hand_computation() -> None:
    # Prepare
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        p_t, p_s = _softmax(t_row, t), _softmax(s_row, t)
        expected += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    expected = expected / len(student) * t**2
    # Execute
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature=t)
    # Assert
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_is_zero_for_identical_logits() -> None:
    logits = torch.randn(8, 10)
    assert kd_loss(logits, logits.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_positive_for_different_logits_and_trains_the_student_only() -> None:
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss = kd_loss(student, teacher, 3.0)
    loss.backward()
    assert loss.item() > 0
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_ce_kd_loss_adds_alpha_times_kd_to_cross_entropy_and_returns_its_parts() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.randint(0, 4, (6,), generator=gen)
    # CE and KD by hand: -log softmax at the label; T^2 * KL(p_teacher || p_student)
    ce = -torch.log_softmax(logits, 1)[torch.arange(6), labels].mean().item()
    p_teacher = torch.softmax(teacher / 3.0, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(logits / 3.0, 1))).sum(1).mean()
    kd = 9.0 * kl.item()
    # Execute
    plain = ce_kd_loss(logits, labels, None)
    combined = ce_kd_loss(logits, labels, teacher, temperature=3.0, alpha=0.5)
    # Assert
    assert plain.loss.item() == pytest.approx(ce) and plain.kd.item() == 0.0
    assert combined.ce.item() == pytest.approx(ce)
    assert combined.kd.item() == pytest.approx(kd, rel=1e-5)
    assert combined.loss.item() == pytest.approx(ce + 0.5 * kd, rel=1e-5)


def test_kd_loss_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
