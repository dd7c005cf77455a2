"""QA distillation between a teacher and a student that tokenize differently: start/end
probabilities moved through the context's characters, the teacher window each student window
takes its targets from, and the refusals that remain.

Three tokenizer kinds, all built offline: byte-level BPE with RoBERTa's special tokens (trained
on a few Spanish sentences, cased, leading-space quirk), WordPiece (MiniLM's uncased vocabulary,
accents stripped) and a SentencePiece-style Unigram with `▁` word markers and NFKD (accents
decomposed into combining marks, so pieces overlap on one character).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from distill.config import Config
from distill.objective.losses import SoftLabelLoss
from distill.tasks.qa import QATask
from distill.tasks.qa_spans import (
    LOG_ZERO,
    answer_tokens,
    map_positions,
    move_probabilities,
    pick_teacher_window,
    tokenize_windows,
)
from tests.conftest import SPANISH, minilm_path, tiny_bert_config, train_bpe_tokenizer

ACCENTED = "La niña comió piñas en España en 1819."
CONTEXTS = [
    ACCENTED,
    "El Museo del Prado, situado en Madrid, abrió sus puertas en 1819; reúne obras de Velázquez y Goya.",
    "Ñandúes y pingüinos viven lejos: el ñandú corre por la pampa, el pingüino nada en el mar.",
]
# (context index, answer): answers start and end at word edges that the tokenizers split
# differently (BPE keeps `piñas` in five pieces, WordPiece in two, Unigram in others)
ANSWERS = [
    (0, "piñas"), (0, "España"), (0, "1819"), (0, "La niña"), (0, "comió piñas"),
    (1, "Velázquez"), (1, "Madrid"), (1, "reúne obras"), (1, "Goya"), (1, "Museo del Prado"),
    (2, "pingüinos"), (2, "ñandú corre"), (2, "Ñandúes"), (2, "el mar"),
]
QUESTION = "¿Qué?"


def unigram_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram tokenizer (ALBERT's layout: [CLS] A [SEP] B [SEP])."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=180, special_tokens=["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"], unk_token="<unk>"
    )
    tok.train_from_iterator((SPANISH + CONTEXTS) * 4, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    return {
        "bpe": train_bpe_tokenizer(tmp_path_factory.mktemp("bpe")),
        "wordpiece": AutoTokenizer.from_pretrained(minilm_path()),
        "unigram": unigram_tokenizer(),
    }


def make_task(raw: DatasetDict, max_length: int, stride: int, **distill) -> QATask:
    cfg = Config()
    cfg.task.family = "qa"
    cfg.data.max_length, cfg.data.doc_stride = max_length, stride
    for key, value in distill.items():
        setattr(cfg.distill, key, value)
    task = QATask(cfg.task, cfg.data)
    task.setup(raw)
    return task


def rows(pairs: list[tuple[int, str]], contexts: list[str] = CONTEXTS) -> list[dict]:
    return [
        {
            "id": f"q{i}",
            "context": contexts[c],
            "question": QUESTION,
            "answers": {"text": [text], "answer_start": [contexts[c].index(text)]},
        }
        for i, (c, text) in enumerate(pairs)
    ]


def context_tokens(tok, window) -> list[tuple[int, str, tuple[int, int]]]:
    return [
        (i, tok.convert_ids_to_tokens(window.inputs["input_ids"][i]), tuple(window.offsets[i]))
        for i, m in enumerate(window.context_mask)
        if m
    ]


# ---------------------------------------------------------------------------------------------
# Identical tokenizers: nothing changes
# ---------------------------------------------------------------------------------------------


def test_identical_tokenizers_keep_the_old_targets_and_mapping_is_the_identity(tokenizers):
    tok = tokenizers["wordpiece"]
    raw = DatasetDict(train=Dataset.from_list(rows(ANSWERS)))
    task = make_task(raw, max_length=24, stride=6)
    task.bind(tok, AutoTokenizer.from_pretrained(minilm_path()))  # the same tokenizer, loaded again
    assert task.teacher_tokenizer is None and task.kd_target_keys == ("start_logits", "end_logits")
    feats = task.preprocess(raw["train"], "train")
    assert not any(c.startswith("teacher_") for c in feats.column_names)
    batch = task.collate(list(feats))
    torch.manual_seed(0)
    shape = batch["input_ids"].shape
    out = type("Out", (), {"start_logits": torch.randn(shape), "end_logits": torch.randn(shape)})()
    old = task.kd_targets(out, batch, teacher=True)
    assert old["start_logits"] is out.start_logits and old["end_logits"] is out.end_logits

    # The character mapping forced on the same tokenizer is the identity: the moved targets are
    # the teacher's own softmax over context + CLS, and the KD loss is the old one at any T.
    across = make_task(raw, max_length=24, stride=6)
    across.bind_across(tok, tok)
    feats_x = across.preprocess(raw["train"], "train")
    assert feats_x["input_ids"] == feats["input_ids"] and feats_x["teacher_input_ids"] == feats["input_ids"]
    batch_x = across.collate(list(feats_x))
    moved = across.kd_targets(out, batch_x, teacher=True)
    mask = task.kd_class_mask(batch)
    assert torch.equal(moved["kd_mask"], mask)
    for key in ("start_logits", "end_logits"):
        expected = getattr(out, key).masked_fill(~mask, float("-inf")).log_softmax(-1)
        assert torch.allclose(moved[key][mask], expected[mask], atol=1e-5)
        assert (moved[key][~mask] == LOG_ZERO).all()
    student = {k: torch.randn(shape) for k in ("start_logits", "end_logits")}
    for t in (1.0, 2.5):
        loss = SoftLabelLoss("kl", t)
        before = loss(task.kd_pairs(student, old, batch))
        s_x = dict(student, kd_mask=across.kd_class_mask(batch_x))
        assert torch.allclose(loss(across.kd_pairs(s_x, moved, batch_x)), before, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# A hand-built BPE -> WordPiece example on an accented context
# ---------------------------------------------------------------------------------------------


def test_bpe_teacher_to_wordpiece_student_moves_mass_to_the_right_tokens(tokenizers):
    bpe, wp = tokenizers["bpe"], tokenizers["wordpiece"]
    (s_win,), (t_win,) = (tokenize_windows(t, ["¿Qué comió?"], [ACCENTED], 64, 16, ["row 0"])[0] for t in (wp, bpe))
    # what each tokenizer makes of the context (offsets are characters: ñ is one)
    assert [(tok, span) for _, tok, span in context_tokens(wp, s_win)] == [
        ("la", (0, 2)), ("nina", (3, 7)), ("com", (8, 11)), ("##io", (11, 13)), ("pin", (14, 17)),
        ("##as", (17, 19)), ("en", (20, 22)), ("espana", (23, 29)), ("en", (30, 32)), ("1819", (33, 37)),
        (".", (37, 38)),
    ]
    t_ctx = context_tokens(bpe, t_win)
    assert [(tok, span) for _, tok, span in t_ctx] == [
        ("La", (0, 2)), ("Ġni", (3, 5)), ("Ã±a", (5, 7)), ("Ġcom", (8, 11)), ("i", (11, 12)),
        ("Ã³", (12, 13)), ("Ġp", (14, 15)), ("i", (15, 16)), ("Ã", (16, 17)), ("±", (16, 17)),
        ("as", (17, 19)), ("Ġen", (20, 22)), ("Ġ", (23, 23)), ("E", (23, 24)), ("s", (24, 25)),
        ("p", (25, 26)), ("a", (26, 27)), ("Ã±a", (27, 29)), ("Ġen", (30, 32)), ("Ġ", (33, 33)),
        ("1", (33, 34)), ("8", (34, 35)), ("1", (35, 36)), ("9", (36, 37)), (".", (37, 38)),
    ]
    t_pos = {(tok, span): i for i, tok, span in t_ctx}
    s_pos = {tok: i for i, tok, _ in context_tokens(wp, s_win)}
    start_map, end_map, covered = map_positions(ACCENTED, s_win, t_win)

    def teacher_logits(probs: dict) -> torch.Tensor:
        logits = torch.full((1, len(t_win.context_mask)), LOG_ZERO)
        for where, p in probs.items():
            logits[0, t_win.cls_index if where == "CLS" else t_pos[where]] = math.log(p)
        return logits

    start = teacher_logits({
        "CLS": 0.1,
        ("Ġni", (3, 5)): 0.05,  # niña
        ("Ġp", (14, 15)): 0.4, ("i", (15, 16)): 0.05, ("Ã", (16, 17)): 0.05, ("±", (16, 17)): 0.05,  # piñ
        ("as", (17, 19)): 0.1,  # the `as` of piñas: WordPiece's ##as
        ("Ġ", (23, 23)): 0.05, ("E", (23, 24)): 0.1, ("Ã±a", (27, 29)): 0.05,  # España
    })
    end = teacher_logits({
        "CLS": 0.1, ("as", (17, 19)): 0.5, ("9", (36, 37)): 0.2, ("1", (33, 34)): 0.1, ("Ã", (16, 17)): 0.1,
    })
    cov = torch.tensor([covered], dtype=torch.bool)
    q_start = move_probabilities(start, torch.tensor([start_map]), cov).exp()[0]
    q_end = move_probabilities(end, torch.tensor([end_map]), cov).exp()[0]
    by_hand_start = {"[CLS]": 0.1, "nina": 0.05, "pin": 0.55, "##as": 0.1, "espana": 0.2}
    by_hand_end = {"[CLS]": 0.1, "##as": 0.5, "1819": 0.3, "pin": 0.1}
    s_pos["[CLS]"] = s_win.cls_index
    for q, by_hand in ((q_start, by_hand_start), (q_end, by_hand_end)):
        expected = torch.zeros_like(q)
        for tok, p in by_hand.items():
            expected[s_pos[tok]] = p
        assert torch.allclose(q, expected, atol=1e-6), (q, expected)
    # one window each: every student context token is covered
    assert [i for i, c in enumerate(covered) if c] == [s_win.cls_index] + [i for i, _, _ in context_tokens(wp, s_win)]


# ---------------------------------------------------------------------------------------------
# Every pairing: the teacher's gold start/end land on the student's gold start/end
# ---------------------------------------------------------------------------------------------

PAIRS = [(t, s) for t in ("bpe", "wordpiece", "unigram") for s in ("bpe", "wordpiece", "unigram") if t != s]


@pytest.mark.parametrize("teacher_kind,student_kind", PAIRS)
def test_gold_spans_move_onto_gold_spans_in_every_pairing(tokenizers, teacher_kind, student_kind):
    """A teacher sure of the gold span (all mass on its gold start / end token) becomes a
    student target sure of the student's gold span, in every window both hold the answer;
    windows that do not hold the answer's start get the mass at CLS (the long-context tests
    below check that case by hand)."""
    t_tok, s_tok = tokenizers[teacher_kind], tokenizers[student_kind]
    # (student, teacher) window sizes: one window per context on both sides, then short
    # windows (several per context, different on the two sides)
    for s_size, t_size, one_window in (((128, 32), (128, 32), True), ((36, 10), (30, 12), False)):
        checked = 0
        for c, text in ANSWERS:
            context = CONTEXTS[c]
            lo = context.index(text)
            hi = lo + len(text)
            s_windows = tokenize_windows(s_tok, [QUESTION], [context], *s_size, ["row"])[0]
            t_windows = tokenize_windows(t_tok, [QUESTION], [context], *t_size, ["row"])[0]
            t_bounds = [w.bounds() for w in t_windows]
            for s_win in s_windows:
                t_win = t_windows[pick_teacher_window(s_win.bounds(), t_bounds)]
                start_map, end_map, covered = map_positions(context, s_win, t_win)
                s_gold = answer_tokens(s_win.offsets, s_win.context_mask, lo, hi)
                t_gold = answer_tokens(t_win.offsets, t_win.context_mask, lo, hi)
                if s_gold and t_gold:
                    assert start_map[t_gold[0]] == s_gold[0], (text, teacher_kind, student_kind)
                    assert end_map[t_gold[1]] == s_gold[1], (text, teacher_kind, student_kind)
                    assert covered[s_gold[0]] and covered[s_gold[1]]
                    checked += 1
                s_lo, s_hi = s_win.bounds()
                if t_gold and not s_lo <= lo < s_hi:
                    assert start_map[t_gold[0]] == s_win.cls_index
                # every teacher context/CLS position sends its mass into the student window
                targets = {i for i in start_map + end_map if i >= 0}
                assert targets <= {i for i, m in enumerate(s_win.context_mask) if m} | {s_win.cls_index}
        assert checked == len(ANSWERS) if one_window else checked > 0


# ---------------------------------------------------------------------------------------------
# Across windows: a context longer than both windows
# ---------------------------------------------------------------------------------------------

# forty two-letter words, one WordPiece token each: window edges fall where the arithmetic says
LONG = "el la de en lo se un no su es al le ya ha si me mi tu yo va da ve of to in is as by on at it an or be we he do go so up".split()


def long_setup(tok, teacher_context: int, teacher_stride: int):
    context = " ".join(LONG)
    raw = DatasetDict(train=Dataset.from_list([
        {"id": "long", "context": context, "question": "¿qué?", "answers": {"text": ["ve"], "answer_start": [context.index(" ve ") + 1]}}
    ]))
    q_len = len(tok.tokenize("¿qué?"))
    task = make_task(raw, max_length=q_len + 3 + 14, stride=4)  # student: 14 context tokens
    task.bind_across(tok, tok, teacher_max_length=q_len + 3 + teacher_context, teacher_doc_stride=teacher_stride)
    return task, task.preprocess(raw["train"], "train")


def window_words(tok, ids: list[int]) -> list[str]:
    return [w for w in tok.convert_ids_to_tokens(ids) if w in LONG]


def test_each_student_window_takes_the_teacher_window_where_it_is_most_central(tokenizers):
    tok = tokenizers["wordpiece"]
    assert len(LONG) == 40 and all(len(tok.tokenize(w)) == 1 for w in LONG)
    # teacher windows of 24 words moving by 8: [0,24) [8,32) [16,40); student windows of 14
    # moving by 10: [0,14) [10,24) [20,34) [30,40)
    task, feats = long_setup(tok, teacher_context=24, teacher_stride=16)
    students = [window_words(tok, ids) for ids in feats["input_ids"]]
    teachers = [window_words(tok, ids) for ids in feats["teacher_input_ids"]]
    assert students == [LONG[0:14], LONG[10:24], LONG[20:34], LONG[30:40]]
    # [0,14) only fits in [0,24); [10,24) fits in [0,24) (margins 10 and 0) and [8,32)
    # (margins 2 and 8): the latter is more central; [20,34) only fits in [16,40); so does [30,40)
    assert teachers == [LONG[0:24], LONG[8:32], LONG[16:40], LONG[16:40]]
    for f in feats:  # all covered
        assert [i for i, c in enumerate(f["teacher_covered"]) if c] == [0] + [i for i, m in enumerate(f["context_mask"]) if m]
    # the rule by itself, on character ranges
    assert pick_teacher_window((10, 20), [(0, 20), (5, 30), (8, 22)]) == 1
    assert pick_teacher_window((10, 40), [(0, 20), (5, 30), (25, 60)]) == 1  # most overlap
    assert pick_teacher_window((10, 20), [(0, 30), (0, 30)]) == 0  # ties: the earlier


def test_shorter_teacher_windows_leave_positions_without_target_and_move_mass_to_cls(tokenizers):
    tok = tokenizers["wordpiece"]
    # teacher windows of 20 words moving by 12: [0,20) [12,32) [24,40)
    task, feats = long_setup(tok, teacher_context=20, teacher_stride=8)
    teachers = [window_words(tok, ids) for ids in feats["teacher_input_ids"]]
    # [10,24): 10 words in [0,20), 12 in [12,32) -> the latter; [20,34): 12 in [12,32), 10 in [24,40)
    assert teachers == [LONG[0:20], LONG[12:32], LONG[12:32], LONG[24:40]]
    uncovered = []
    for f in feats:
        ctx = [i for i, m in enumerate(f["context_mask"]) if m]
        words = window_words(tok, f["input_ids"])
        uncovered.append([words[k] for k, i in enumerate(ctx) if not f["teacher_covered"][i]])
    assert uncovered == [[], LONG[10:12], LONG[32:34], []]

    # Each teacher window: start mass 0.6 on word 21, 0.3 on word 26, 0.1 at CLS, renormalised
    # over the words it holds.
    batch = task.collate(list(feats))
    t_ids = batch["teacher_input_ids"]
    logits = torch.full(t_ids.shape, LOG_ZERO)
    for row in range(len(feats)):
        logits[row, 0] = math.log(0.1)
        for word, p in ((LONG[21], 0.6), (LONG[26], 0.3)):
            hit = (t_ids[row] == tok.convert_tokens_to_ids(word)).nonzero()
            if len(hit):
                logits[row, hit[0, 0]] = math.log(p)
    out = type("Out", (), {"start_logits": logits, "end_logits": logits})()
    q = task.kd_targets(out, batch, teacher=True)["start_logits"].exp()

    def target(row: int) -> dict[str, float]:
        words = window_words(tok, batch["input_ids"][row].tolist())
        ctx = [i for i, m in enumerate(batch["context_mask"][row].tolist()) if m]
        got = {"CLS": round(float(q[row, 0]), 6)}
        got.update({words[k]: round(float(q[row, i]), 6) for k, i in enumerate(ctx) if q[row, i] > 0})
        return got

    # [0,14) <- [0,20), which holds neither word: all at CLS. [10,24) <- [12,32): word 26 is
    # outside the student window, so its 0.3 joins CLS ("not among the covered words"; words
    # 10-11 have no target). [20,34) <- [12,32): both words inside. [30,40) <- [24,40): 0.3 /
    # (0.3 + 0.1) on word 26, outside the student window, joins CLS.
    assert [target(r) for r in range(len(feats))] == [
        {"CLS": 1.0},
        {"CLS": 0.4, LONG[21]: 0.6},
        {"CLS": 0.1, LONG[21]: 0.6, LONG[26]: 0.3},
        {"CLS": 1.0},
    ]
    assert batch["teacher_covered"][:, 0].all()  # CLS always has a target


# ---------------------------------------------------------------------------------------------
# Through the task: features, collate, teacher forward, loss
# ---------------------------------------------------------------------------------------------


def test_tiny_bpe_teacher_distils_a_wordpiece_student_through_the_task(tokenizers):
    from transformers import AutoModelForQuestionAnswering, RobertaConfig

    bpe, wp = tokenizers["bpe"], tokenizers["wordpiece"]
    raw = DatasetDict(train=Dataset.from_list(rows(ANSWERS)))
    task = make_task(raw, max_length=24, stride=6)
    task.bind(wp, bpe)
    assert task.teacher_tokenizer is bpe and task.kd_target_keys == ("start_logits", "end_logits", "kd_mask")
    feats = task.preprocess(raw["train"], "train")
    assert {"teacher_input_ids", "teacher_start_map", "teacher_end_map", "teacher_covered"} <= set(feats.column_names)
    assert "teacher_token_type_ids" not in feats.column_names  # RoBERTa has none
    batch = task.collate(list(feats))
    t_seq = batch["teacher_input_ids"].size(1)
    assert batch["teacher_start_map"].shape == (len(feats), t_seq)
    assert batch["teacher_covered"].shape == batch["input_ids"].shape
    torch.manual_seed(0)
    student = AutoModelForQuestionAnswering.from_config(tiny_bert_config())
    teacher = AutoModelForQuestionAnswering.from_config(
        RobertaConfig(vocab_size=len(bpe), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=514, pad_token_id=bpe.pad_token_id)
    ).eval()
    with torch.no_grad():
        t_targets = task.kd_targets(teacher(**task.model_inputs(batch, teacher=True)), batch, teacher=True)
    out = student(**task.model_inputs(batch))
    s_targets = task.kd_targets(out, batch, teacher=False)
    assert set(s_targets) == set(t_targets) == set(task.kd_target_keys)
    for key in ("start_logits", "end_logits"):
        assert t_targets[key].shape == batch["input_ids"].shape
        probs = t_targets[key].exp() * t_targets["kd_mask"]
        assert torch.allclose(probs.sum(-1), torch.ones(len(feats)), atol=1e-5)
        assert not (t_targets[key].exp() * ~batch["teacher_covered"].bool()).any()
    loss = SoftLabelLoss("kl", 2.0)(task.kd_pairs(s_targets, t_targets, batch))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and student.qa_outputs.weight.grad.abs().sum() > 0
    # the student's own gold labels are those of the student tokenizer alone
    alone = make_task(raw, max_length=24, stride=6)
    alone.bind(wp)
    solo = alone.preprocess(raw["train"], "train")
    for key in ("input_ids", "start_positions", "end_positions", "offset_mapping"):
        assert solo[key] == feats[key]


def test_slow_tokenizers_and_mse_are_refused_across_tokenizers(tokenizers):
    raw = DatasetDict(train=Dataset.from_list(rows(ANSWERS[:2])))

    class SlowTokenizer:  # what a tokenizer without offset mapping looks like to the task
        is_fast = False

        def get_vocab(self) -> dict:
            return {"hola": 0}

    task = make_task(raw, 64, 16)
    with pytest.raises(ValueError, match=r"teacher's SlowTokenizer is a slow tokenizer with no offset mapping"):
        task.bind(tokenizers["wordpiece"], SlowTokenizer())
    with pytest.raises(ValueError, match=r"student's SlowTokenizer is a slow tokenizer"):
        task.bind(SlowTokenizer(), tokenizers["bpe"])
    from distill.errors import StageError
    from distill.loop.setup import bind_tokenizers

    task = make_task(raw, 64, 16, kd_loss="mse")
    with pytest.raises(StageError, match=r"kd_loss=mse .* use distill.kd_loss=kl or ce"):
        bind_tokenizers(task, tokenizers["wordpiece"], tokenizers["bpe"], kd_loss="mse")
    bind_tokenizers(task, tokenizers["wordpiece"], AutoTokenizer.from_pretrained(minilm_path()), kd_loss="mse")  # same: fine


@pytest.mark.parametrize("recipe", ["mlqa", "sqac", "tar_xquad"])
def test_the_qa_recipes_roberta_bne_variant_is_a_valid_recipe(recipe, tmp_path):
    """The commented RoBERTa-BNE teacher section of each QA recipe, uncommented in place of
    the recipe's own, loads as a valid config with a teacher that tokenizes unlike ALBETO."""
    import yaml
    from pathlib import Path

    from distill.config import load_config

    text = (Path(__file__).parent.parent / "recipes" / f"{recipe}.yaml").read_text()
    marker = "# or replace the teacher section and output_dir above with:\n"
    assert marker in text
    variant = yaml.safe_load("".join(line[2:] + "\n" for line in text.split(marker)[1].splitlines()))
    merged = dict(yaml.safe_load(text), **variant)
    (tmp_path / "variant.yaml").write_text(yaml.safe_dump(merged))
    cfg = load_config(tmp_path / "variant.yaml")
    assert cfg.teacher.model == "PlanTL-GOB-ES/roberta-base-bne" and cfg.student.model.startswith("albeto")
    assert cfg.output_dir.endswith("-from-roberta-bne") and "roberta-bne" in cfg.teacher.dir
    assert cfg.distill.kd_loss in ("kl", "ce") and cfg.distill.hidden_weight == 0
    assert cfg.teacher.max_length <= 512
