"""Combination rules for several teachers, against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from distill.teachers.ensemble import MASKED_LOGIT, combine
from distill.objective.losses import soft_label_loss

LN3, LN9 = math.log(3.0), math.log(9.0)


def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


# Row 0: teacher A is uniform (p = [.5, .5], entropy ln 2 = .693), teacher B gives [.75, .25]
# (entropy .562). Row 1: A gives [.9, .1] (entropy .325), B is uniform.
A = torch.tensor([[0.0, 0.0], [LN9, 0.0]])
B = torch.tensor([[LN3, 0.0], [0.0, 0.0]])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mean_of_probabilities(temperature: float):
    # the logits scale with T so that softmax(z / T) is the same distributions at every T
    out = combine([A * temperature, B * temperature], "mean", temperature)
    expected = torch.tensor([[0.625, 0.375], [0.45 + 0.25, 0.05 + 0.25]])  # (p_A + p_B) / 2 by hand
    assert torch.allclose(probs(out, temperature), expected, atol=1e-6)
    # the logits are T * log(mean p) exactly, not merely something with the same softmax
    assert torch.allclose(out, temperature * expected.log(), atol=1e-5)


def test_weighted_normalises_the_weights():
    out = combine([A, B], "weighted", 1.0, weights=[1.0, 3.0])
    # w = [.25, .75]: row 0 = .25 [.5, .5] + .75 [.75, .25]; row 1 = .25 [.9, .1] + .75 [.5, .5]
    expected = torch.tensor([[0.6875, 0.3125], [0.6, 0.4]])
    assert torch.allclose(probs(out, 1.0), expected, atol=1e-6)
    # a zero weight drops that teacher entirely
    only_b = combine([A, B], "weighted", 1.0, weights=[0.0, 2.0])
    assert torch.allclose(probs(only_b, 1.0), probs(B, 1.0), atol=1e-6)


def test_confident_takes_the_lowest_entropy_teacher_per_row():
    out = combine([A, B], "confident", 1.0)
    assert torch.equal(out[0], B[0]) and torch.equal(out[1], A[1])
    # a tie goes to the first teacher
    assert torch.equal(combine([A, A.clone() + 0.0], "confident", 1.0), A)
    # the temperature changes the entropies but not their order here; the row keeps its logits
    assert torch.equal(combine([A * 2, B * 2], "confident", 2.0)[0], B[0] * 2)


def test_class_mask_keeps_positions_out_of_every_rule():
    # a third, masked position with a huge logit in A: unmasked, it would make A look certain
    a = torch.tensor([[0.0, 0.0, 100.0]])
    b = torch.tensor([[LN3, 0.0, -5.0]])
    mask = torch.tensor([[True, True, False]])
    mean = combine([a, b], "mean", 1.0, class_mask=mask)
    assert mean[0, 2].item() == MASKED_LOGIT
    assert torch.allclose(probs(mean, 1.0), torch.tensor([[0.625, 0.375, 0.0]]), atol=1e-6)
    confident = combine([a, b], "confident", 1.0, class_mask=mask)
    assert torch.allclose(confident[0, :2], b[0, :2]) and confident[0, 2].item() == MASKED_LOGIT
    unmasked = combine([a, b], "confident", 1.0)
    assert torch.equal(unmasked, a)  # without the mask, A's masked spike wins


def test_kd_loss_on_combined_targets_is_the_loss_against_the_mean_distribution():
    torch.manual_seed(0)
    teachers = [torch.randn(4, 5) for _ in range(3)]
    student = torch.randn(4, 5)
    temperature = 2.0
    target = combine(teachers, "mean", temperature)
    p_bar = torch.stack([probs(t, temperature) for t in teachers]).mean(0)  # [4, 5]
    log_ps = torch.log_softmax(student / temperature, -1)
    by_hand = temperature**2 * (p_bar * (p_bar.log() - log_ps)).sum(-1).mean()
    assert torch.allclose(soft_label_loss(student, target, "kl", temperature), by_hand, atol=1e-5)


def test_extreme_logits_stay_finite():
    a = torch.tensor([[0.0, -2000.0]])
    b = torch.tensor([[0.0, -3000.0]])
    out = combine([a, b], "mean", 1.0)
    assert torch.isfinite(out).all()
    assert out[0, 1].item() == pytest.approx(-2000.0 - math.log(2), abs=1e-2)  # log(e^-2000 / 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"teacher_logits": []}, "no teacher logits"),
        ({"rule": "max"}, "unknown teacher combination rule 'max'"),
        ({"temperature": 0.0}, "temperature must be"),
        ({"teacher_logits": [A, B[:, :1]]}, "teacher 1 gives logits of shape"),
        ({"rule": "weighted"}, "needs weights"),
        ({"rule": "weighted", "weights": [1.0]}, "1 weights for 2 teachers"),
        ({"rule": "weighted", "weights": [1.0, -1.0]}, "finite and >= 0"),
        ({"rule": "weighted", "weights": [0.0, 0.0]}, "all zero"),
        ({"rule": "mean", "weights": [1.0, 1.0]}, "only used by rule 'weighted'"),
        ({"class_mask": torch.ones(3, 2, dtype=torch.bool)}, "class_mask has shape"),
    ],
)
def test_bad_inputs(kwargs: dict, message: str):
    args = {"teacher_logits": [A, B], "rule": "mean", "temperature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        combine(**args)
