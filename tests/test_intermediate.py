"""Attention-score (TinyBERT) and self-attention relation (MiniLMv2) terms against hand
computations written with plain loops, plus the terms on real tiny models through the capture."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AlbertConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from distill.objective.capture import QKV, Capture
from distill.errors import StageError
from distill.objective.intermediate import (
    AttentionTerm,
    RelationTerm,
    attention_scores,
    default_relation_heads,
    intermediate_terms,
    relation_kl,
)
from tests.conftest import minilm_path, train_bpe_tokenizer

try:
    from distill.objective.losses import Signals
except ImportError:  # the loop's Signals: only qkv and attention_mask are read here
    def Signals(**kw):  # noqa: N802
        return SimpleNamespace(**{"qkv": None, "attention_mask": None, **kw})



def rand_qkv(width: int, heads: int, seed: int, batch: int = 2, seq: int = 4) -> QKV:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, seq, width, generator=g) for _ in range(3))  # [batch, seq, width]
    return QKV(q, k, v, heads)


MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # [batch, seq]: second row has 2 real tokens


def hand_scores(q, k, heads):
    """Nested lists [b][h][i][j] of Σ_d q k / √d_head, head h = columns h*d .. (h+1)*d."""
    b_, s_, w = q.shape
    d = w // heads
    q, k = q.tolist(), k.tolist()
    return [[[[sum(q[b][i][h * d + c] * k[b][j][h * d + c] for c in range(d)) / math.sqrt(d)
               for j in range(s_)] for i in range(s_)] for h in range(heads)] for b in range(b_)]


def test_attention_scores_by_hand():
    x = rand_qkv(6, 3, seed=0)
    got = attention_scores(x.q, x.k, 3)  # [batch, heads, seq, seq]
    torch.testing.assert_close(got, torch.tensor(hand_scores(x.q, x.k, 3)))


def hand_attention_loss(students, teachers, heads, mask):
    """mean over layer pairs of Σ over real (query, key) pairs and heads of squared score
    differences, divided by heads × real pairs."""
    per_pair = []
    for s, t in zip(students, teachers):
        a_s, a_t = hand_scores(s.q, s.k, heads), hand_scores(t.q, t.k, heads)
        total, count = 0.0, 0
        for b, row in enumerate(mask.tolist()):
            real = [i for i, m in enumerate(row) if m]
            for h in range(heads):
                for i in real:
                    for j in real:
                        total += (a_s[b][h][i][j] - a_t[b][h][i][j]) ** 2
                        count += 1
        per_pair.append(total / count)
    return sum(per_pair) / len(per_pair)


def test_attention_term_matches_hand_computation():
    # 2-layer student (width 4, 2 heads of 2), 4-layer teacher (width 6, 2 heads of 3)
    term = AttentionTerm(2, 4, student_heads=2, teacher_heads=2)
    assert term.student_layers() == {"qkv": {1, 2}} and term.teacher_layers() == {"qkv": {2, 4}}
    student = Signals(qkv={1: rand_qkv(4, 2, 1), 2: rand_qkv(4, 2, 2)}, attention_mask=MASK)
    teacher = Signals(qkv={2: rand_qkv(6, 2, 3), 4: rand_qkv(6, 2, 4)}, attention_mask=MASK)
    got = term(student, teacher, {"attention_mask": MASK})
    want = hand_attention_loss([student.qkv[1], student.qkv[2]], [teacher.qkv[2], teacher.qkv[4]], 2, MASK)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_attention_term_ignores_padding_and_is_zero_on_itself():
    term = AttentionTerm(1, 1, 2, 2)
    s, t = rand_qkv(4, 2, 1), rand_qkv(4, 2, 2)
    base = term(Signals(qkv={1: s}, attention_mask=MASK), Signals(qkv={1: t}), {}).item()
    padded = QKV(s.q.clone(), s.k.clone(), s.v, 2)
    padded.q[1, 3] += 100.0  # a padded query
    padded.k[1, 2] -= 100.0  # a padded key
    same = term(Signals(qkv={1: padded}, attention_mask=MASK), Signals(qkv={1: t}), {}).item()
    assert same == pytest.approx(base, rel=1e-6)
    padded.q[1, 0] += 1.0  # a real query
    assert term(Signals(qkv={1: padded}, attention_mask=MASK), Signals(qkv={1: t}), {}).item() != pytest.approx(base)
    assert term(Signals(qkv={1: s}, attention_mask=MASK), Signals(qkv={1: s}), {}).item() == 0.0


def test_attention_term_refuses_other_head_counts_and_bad_maps():
    with pytest.raises(ValueError, match=r"12 heads and the teacher 64.*distill\.relation_weight"):
        AttentionTerm(6, 12, 12, 64)
    term = AttentionTerm(2, 4, 2, 2, layer_map=[1, 3])
    assert term.pairs == [(1, 1), (2, 3)]
    with pytest.raises(ValueError, match="2 entries for a 3-layer student"):
        AttentionTerm(3, 4, 2, 2, layer_map=[1, 3])
    with pytest.raises(ValueError, match=r"teacher layers \[5\] are out of range 1\.\.4"):
        AttentionTerm(2, 4, 2, 2, layer_map=[1, 5])


def hand_relation_kl(xs, xt, heads, mask):
    """KL(teacher ‖ student) of softmax(X_h X_hᵀ/√d_r) over real keys, averaged over heads and
    real query rows, with explicit loops."""
    def relations(x):
        b_, s_, w = x.shape
        d = w // heads
        x = x.tolist()
        out = {}
        for b, row in enumerate(mask.tolist()):
            real = [i for i, m in enumerate(row) if m]
            for h in range(heads):
                for i in real:
                    logits = [sum(x[b][i][h * d + c] * x[b][j][h * d + c] for c in range(d)) / math.sqrt(d) for j in real]
                    top = max(logits)
                    exps = [math.exp(v - top) for v in logits]
                    out[b, h, i] = [e / sum(exps) for e in exps]
        return out

    rs, rt = relations(xs), relations(xt)
    kls = [sum(pt * math.log(pt / ps) for pt, ps in zip(rt[key], rs[key])) for key in rt]
    return sum(kls) / len(kls)


def test_relation_kl_by_hand():
    xs, xt = rand_qkv(4, 2, 5).q, rand_qkv(6, 3, 6).q  # widths differ: d_r 2 and 3
    got = relation_kl(xs, xt, 2, MASK.bool())
    assert got.item() == pytest.approx(hand_relation_kl(xs, xt, 2, MASK), rel=1e-5)


def test_relation_term_matches_hand_computation_across_widths_and_heads():
    # student: 2 layers, width 4, 2 heads; teacher: 5 layers, width 6, 3 heads; relations from teacher layer 3
    term = RelationTerm(2, 5, 4, 6, 2, 3, relation_heads=2, relation_layer=3)
    assert term.student_layers() == {"qkv": {2}} and term.teacher_layers() == {"qkv": {3}}
    s, t = rand_qkv(4, 2, 7), rand_qkv(6, 3, 8)
    got = term(Signals(qkv={2: s}, attention_mask=MASK), Signals(qkv={3: t}, attention_mask=MASK), {})
    want = sum(hand_relation_kl(a, b, 2, MASK) for a, b in ((s.q, t.q), (s.k, t.k), (s.v, t.v))) / 3
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert term(Signals(qkv={2: s}, attention_mask=MASK), Signals(qkv={3: s}), {}).item() == pytest.approx(0.0, abs=1e-6)
    assert RelationTerm(2, 5, 4, 6, 2, 3).teacher_layers() == {"qkv": {5}}  # default: the teacher's last


def test_default_relation_heads():
    assert default_relation_heads(312, 4096, 12) == 8  # ALBETO tiny from xxlarge: 64 does not divide 312
    assert default_relation_heads(768, 4096, 12) == 64  # ALBETO base from xxlarge
    assert default_relation_heads(312, 768, 12) == 12  # ALBETO tiny from BETO
    assert default_relation_heads(384, 384, 12) == 12  # MiniLM cut
    assert RelationTerm(6, 12, 312, 4096, 12, 64).relation_heads == 8


def test_relation_term_errors_name_the_key():
    with pytest.raises(ValueError, match=r"relation_heads=64 does not divide the student width 312.*\[1, 2, 4, 8\]"):
        RelationTerm(4, 12, 312, 4096, 12, 64, relation_heads=64)
    with pytest.raises(ValueError, match=r"relation_layer=13: the teacher has layers 1\.\.12"):
        RelationTerm(4, 12, 312, 768, 12, 12, relation_layer=13)
    term = RelationTerm(2, 4, 4, 4, 2, 2)
    with pytest.raises(RuntimeError, match="teacher's layer 4 Q/K/V were not captured"):
        term(Signals(qkv={2: rand_qkv(4, 2, 0)}), Signals(qkv={}), {})
    s, t = rand_qkv(4, 2, 0), rand_qkv(4, 2, 1, seq=5)
    with pytest.raises(ValueError, match="positions"):
        term(Signals(qkv={2: s}), Signals(qkv={4: t}), {})


def tiny(config):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


def test_relations_train_an_albert_student_from_a_wider_bert_teacher():
    """End to end through the capture: a 3-application ALBERT (32 wide, 2 heads) learns the
    relations of a 4-layer BERT (48 wide, 4 heads) read at layer 3, teacher stopped there."""
    teacher = tiny(BertConfig(vocab_size=99, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=64)).eval()
    student = tiny(AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=2, intermediate_size=64))
    (term,) = intermediate_terms(
        SimpleNamespace(layer_map=[], relation_heads=0, relation_layer=3), student.config, teacher.config,
        {"relations": 1.0, "attention": 0.0},
    )
    assert term.relation_heads == 2 and term.teacher_layers() == {"qkv": {3}}
    torch.manual_seed(2)
    ids, mask = torch.randint(5, 99, (4, 8)), torch.ones(4, 8, dtype=torch.long)
    mask[2:, 5:] = 0
    with torch.no_grad(), Capture(teacher, qkv={3}, stop_after=3) as t_cap:
        teacher(input_ids=ids, attention_mask=mask)
    assert t_cap.stopped
    target = Signals(qkv=t_cap.qkv, attention_mask=mask)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        with Capture(student, qkv=term.student_layers()["qkv"]) as s_cap:
            student(input_ids=ids, attention_mask=mask)
        loss = term(Signals(qkv=s_cap.qkv, attention_mask=mask), target, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_intermediate_terms_follow_the_weights():
    s = AlbertConfig(hidden_size=32, num_hidden_layers=2, inner_group_num=2, num_attention_heads=2)
    t = BertConfig(hidden_size=32, num_hidden_layers=8, num_attention_heads=2)
    d = SimpleNamespace(layer_map=[], relation_heads=4, relation_layer=0)
    terms = intermediate_terms(d, s, t, {"attention": 1.0, "relations": 0.5})
    assert [x.name for x in terms] == ["attention", "relations"]
    # ALBERT with 2 inner layers per group application: 4 layers, mapped uniformly onto 8
    assert terms[0].pairs == [(1, 2), (2, 4), (3, 6), (4, 8)]
    assert terms[1].student_layers() == {"qkv": {4}} and terms[1].relation_heads == 4
    assert all(x.intermediate for x in terms)
    assert intermediate_terms(d, s, t, {"kd": 1.0}) == []


def test_position_terms_between_tokenizers_are_refused_naming_the_key_and_both(tmp_path):
    """The stage's check (`loop.setup.bind_tokenizers`): terms that compare token positions need
    one tokenizer; logit terms align different ones; the error names the recipe key to turn off
    and both tokenizers."""
    from datasets import Dataset, DatasetDict

    from distill.config import Config
    from distill.loop.setup import bind_tokenizers
    from distill.tasks.classification import ClassificationTask

    def task():
        cfg = Config()
        t = ClassificationTask(cfg.task, cfg.data)
        t.setup(DatasetDict(train=Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]})))
        return t

    minilm = AutoTokenizer.from_pretrained(minilm_path())
    bpe = train_bpe_tokenizer(tmp_path / "bpe")
    bind_tokenizers(task(), minilm, AutoTokenizer.from_pretrained(minilm_path()), ["relations"])  # same: fine
    bind_tokenizers(task(), minilm, bpe, [])  # logit terms align different tokenizers elsewhere
    with pytest.raises(StageError, match=(
        rf"relations term compares token positions.*{type(bpe).__name__} of vocabulary {len(bpe)} vs "
        rf"{type(minilm).__name__} of vocabulary {len(minilm)}.*distill\.relation_weight=0"
    )):
        bind_tokenizers(task(), minilm, bpe, ["relations"])
    with pytest.raises(StageError, match=r"hidden/attention term.*distill\.hidden_weight, distill\.attention_weight=0"):
        bind_tokenizers(task(), minilm, bpe, ["hidden", "attention"])
