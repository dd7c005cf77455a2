"""Loss terms against hand computations of their formulas."""

import math

import pytest
import torch

from distill.objective.losses import HiddenStateLoss, SoftLabelLoss, soft_label_loss, uniform_layer_map
from distill.tasks.base import LogitPair


def softmax(xs, t=1.0):
    es = [math.exp(x / t) for x in xs]
    return [e / sum(es) for e in es]


def kl_by_hand(s, t, temp):
    ps, pt = softmax(s, temp), softmax(t, temp)
    return temp**2 * sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_kl_matches_formula(temp):
    expected = (kl_by_hand(S[0], T[0], temp) + kl_by_hand(S[1], T[1], temp)) / 2
    got = soft_label_loss(torch.tensor(S), torch.tensor(T), "kl", temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_soft_ce_matches_formula(temp):
    def ce(s, t):
        ps, pt = softmax(s, temp), softmax(t, temp)
        return temp**2 * -sum(b * math.log(a) for a, b in zip(ps, pt))

    expected = (ce(S[0], T[0]) + ce(S[1], T[1])) / 2
    got = soft_label_loss(torch.tensor(S), torch.tensor(T), "ce", temp)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_ce_equals_kl_plus_teacher_entropy():
    s, t = torch.tensor(S), torch.tensor(T)
    pt = torch.softmax(t, -1)
    entropy = -(pt * pt.log()).sum(-1).mean()
    assert soft_label_loss(s, t, "ce").item() == pytest.approx((soft_label_loss(s, t, "kl") + entropy).item(), rel=1e-5)


def test_mse_on_raw_logits_ignores_temperature():
    expected = sum((a - b) ** 2 for rs, rt in zip(S, T) for a, b in zip(rs, rt)) / 6
    for temp in (1.0, 4.0):
        got = soft_label_loss(torch.tensor(S), torch.tensor(T), "mse", temp)
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_identical_logits_give_zero_kl():
    x = torch.randn(5, 7)
    assert soft_label_loss(x, x.clone(), "kl", 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_row_mask_drops_padded_rows():
    """A padded row (e.g. a padding word) changes nothing, however wild its logits."""
    s, t = torch.tensor(S), torch.tensor(T)
    mask = torch.tensor([True, False])
    expected = kl_by_hand(S[0], T[0], 1.0)
    got = soft_label_loss(s, t, "kl", 1.0, row_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    s2 = s.clone()
    s2[1] = torch.tensor([100.0, -100.0, 50.0])
    assert soft_label_loss(s2, t, "kl", 1.0, row_mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_class_mask_leaves_classes_out_of_both_softmaxes():
    s = torch.tensor([[1.0, 2.0, 0.5, 9.0]])
    t = torch.tensor([[2.0, 0.0, 1.0, -9.0]])
    cm = torch.tensor([[True, True, True, False]])
    expected = kl_by_hand([1.0, 2.0, 0.5], [2.0, 0.0, 1.0], 2.0)
    got = soft_label_loss(s, t, "kl", 2.0, class_mask=cm)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    s[0, 3], t[0, 3] = -50.0, 70.0  # masked position: no effect
    assert soft_label_loss(s, t, "kl", 2.0, class_mask=cm).item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(soft_label_loss(s, t, "ce", 2.0, class_mask=cm))


def test_soft_label_module_averages_pairs():
    a = LogitPair(torch.tensor([S[0]]), torch.tensor([T[0]]))
    b = LogitPair(torch.tensor([S[1]]), torch.tensor([T[1]]))
    expected = (kl_by_hand(S[0], T[0], 1.0) + kl_by_hand(S[1], T[1], 1.0)) / 2
    assert SoftLabelLoss("kl", 1.0)([a, b]).item() == pytest.approx(expected, rel=1e-5)


def test_gradients_flow_to_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    soft_label_loss(s, t, "kl", 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_bad_kind_and_temperature():
    with pytest.raises(ValueError, match="unknown kd loss"):
        soft_label_loss(torch.zeros(1, 2), torch.zeros(1, 2), "js")
    with pytest.raises(ValueError, match="temperature"):
        SoftLabelLoss("kl", 0.0)


@pytest.mark.parametrize(
    "n, expected",
    [
        (2, [6, 12]),
        (4, [3, 6, 9, 12]),
        (6, [2, 4, 6, 8, 10, 12]),
        (8, [2, 3, 4, 6, 8, 9, 10, 12]),
        (10, [1, 2, 4, 5, 6, 7, 8, 10, 11, 12]),
    ],
)
def test_uniform_layer_map_any_depth(n, expected):
    got = uniform_layer_map(n, 12)
    assert got == expected
    assert len(got) == n and got[-1] == 12 and got == sorted(set(got))


def test_hidden_mse_and_cosine_by_hand():
    torch.manual_seed(0)
    hs = [torch.randn(2, 3, 4) for _ in range(3)]  # embeddings + 2 student layers
    ht = [torch.randn(2, 3, 4) for _ in range(5)]  # embeddings + 4 teacher layers
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss = HiddenStateLoss(2, 4, 4, 4, "mse", include_embeddings=True)
    assert loss.pairs == [(0, 0), (1, 2), (2, 4)]
    keep = mask.bool()
    expected = sum(((hs[i][keep] - ht[j][keep]) ** 2).mean() for i, j in loss.pairs) / 3
    assert loss(hs, ht, mask).item() == pytest.approx(expected.item(), rel=1e-5)

    cos = HiddenStateLoss(2, 4, 4, 4, "cosine", layer_map=[1, 3])
    expected = sum(
        (1 - torch.nn.functional.cosine_similarity(hs[i][keep], ht[j][keep], dim=-1)).mean() for i, j in [(1, 1), (2, 3)]
    ) / 2
    assert cos(hs, ht, mask).item() == pytest.approx(expected.item(), rel=1e-5)


def test_hidden_padding_positions_do_not_count():
    hs = [torch.zeros(1, 3, 4) for _ in range(2)]
    ht = [torch.zeros(1, 3, 4) for _ in range(2)]
    ht[1][0, 2] = 1000.0  # a padding position
    loss = HiddenStateLoss(1, 1, 4, 4, "mse")
    assert loss(hs, ht, torch.tensor([[1, 1, 0]])).item() == 0.0


def test_hidden_projection_when_sizes_differ():
    loss = HiddenStateLoss(4, 12, 312, 768, "mse")
    assert all(isinstance(p, torch.nn.Linear) and p.in_features == 312 and p.out_features == 768 for p in loss.projections)
    hs = [torch.randn(2, 5, 312) for _ in range(5)]
    ht = [torch.randn(2, 5, 768) for _ in range(13)]
    out = loss(hs, ht, torch.ones(2, 5))
    out.backward()
    assert loss.projections[0].weight.grad is not None


def test_hidden_layer_map_errors():
    with pytest.raises(ValueError, match="out of range"):
        HiddenStateLoss(2, 12, 8, 8, layer_map=[6, 13])
    with pytest.raises(ValueError, match="one teacher layer"):
        HiddenStateLoss(2, 12, 8, 8, layer_map=[6])


def test_objective_reads_what_its_active_terms_read():
    """`Objective.needs`: the union of what the terms read from one side (Q/K/V layers, hidden
    states, the outputs), per phase of a two-phase schedule, all phases with every_phase; the
    deepest layer a capture reads; an unknown signal named with its term."""
    from distill.objective.losses import Objective, Reads, Term

    class Layers(Term):
        name, intermediate = "layers", True

        def student_layers(self):
            return {"qkv": {2}}

        def teacher_layers(self):
            return {"qkv": {5}, "hidden": {0, 9}}

    class Logits(Term):
        name, reads_outputs, reads_targets = "logits", True, True

    objective = Objective([Layers(), Logits()], {"layers": 1.0, "logits": 1.0})
    assert objective.needs("teacher") == Reads(frozenset({0, 9}), frozenset({5}), True)
    assert objective.needs("teacher")["hidden"] == {0, 9}  # read like a dict too
    assert objective.needs("teacher").deepest == 9 and objective.needs("student").deepest == 2
    assert objective.needs("student") == Reads(frozenset(), frozenset({2}), True)

    phased = Objective([Layers(), Logits()], {"layers": 1.0, "logits": 1.0}, two_phase=True)
    phased.intermediate_phase = True
    assert phased.needs("teacher") == Reads(frozenset({0, 9}), frozenset({5}), False)
    phased.intermediate_phase = False
    assert phased.needs("teacher") == Reads(outputs=True) and not phased.needs("student").qkv
    assert phased.needs("teacher", every_phase=True) == objective.needs("teacher")
    assert not Reads().anything and Reads(outputs=True).anything

    class Odd(Term):
        name = "odd"

        def teacher_layers(self):
            return {"attentions": {1}}

    with pytest.raises(ValueError, match="term 'odd' asks for unknown signal 'attentions'"):
        Objective([Odd()], {"odd": 1.0}).needs("teacher")
    with pytest.raises(ValueError, match="side must be"):
        objective.needs("both")


def test_hidden_loss_ignores_whatever_sits_at_padded_positions():
    """Padded positions weigh nothing, even holding inf or NaN on the teacher's side, and the
    loss is the mean over real tokens only (compared with the real tokens taken out by hand)."""
    torch.manual_seed(0)
    loss = HiddenStateLoss(1, 1, 4, 6, "mse")
    hs = [torch.randn(2, 5, 4), torch.randn(2, 5, 4, requires_grad=True)]
    ht = [torch.randn(2, 5, 6), torch.randn(2, 5, 6)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ht[1][0, 3:] = float("nan")
    ht[1][0, 4, 0] = float("inf")
    value = loss(hs, ht, mask)
    value.backward()
    real = mask.bool()
    by_hand = ((loss.projections[0](hs[1][real]) - ht[1][real]) ** 2).mean()
    assert torch.isfinite(value) and value.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert torch.isfinite(hs[1].grad).all() and hs[1].grad[0, 3:].abs().sum() == 0
    assert all(torch.isfinite(p.grad).all() for p in loss.parameters())
