"""SQuAD EM/F1 (official and MLQA Spanish normalization), seqeval and token accuracy, checked
against numbers worked out by hand."""

from __future__ import annotations

import pytest

from distill.tasks.metrics import (
    answer_start_mismatch,
    exact_match,
    is_bio,
    normalize_answer,
    seqeval_metrics,
    squad_metrics,
    token_accuracy,
    token_f1,
)


def test_squad_normalization_is_the_official_one():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("a cat, an owl and the dog") == "cat owl and dog"
    # ASCII punctuation only: Spanish marks and Spanish articles survive
    assert normalize_answer("¿La casa?") == "¿la casa"


def test_mlqa_normalization_spanish():
    assert normalize_answer("¿La Casa  Blanca?", "mlqa") == "casa blanca"
    assert normalize_answer("«Los» toros y unas vacas — el fin", "mlqa") == "toros y vacas fin"
    # articles are whole words only
    assert normalize_answer("Elena lava la losa", "mlqa") == "elena lava losa"
    with pytest.raises(ValueError, match="unknown answer normalization 'xx'"):
        normalize_answer("a", "xx")


def test_exact_match_and_f1_by_hand():
    assert exact_match("El Prado", "Prado") == 0.0
    assert exact_match("El Prado", "Prado", "mlqa") == 1.0
    # squad keeps "la": pred [la, casa, blanca, grande] vs [casa, blanca]: P=2/4, R=1 -> 2/3
    assert token_f1("la casa blanca grande", "casa blanca") == pytest.approx(2 / 3)
    # mlqa drops "la": P=2/3, R=1 -> 0.8
    assert token_f1("la casa blanca grande", "casa blanca", "mlqa") == pytest.approx(0.8)
    assert token_f1("Goya", "Velázquez") == 0.0
    # repeated tokens count by multiplicity: common = min counts = 1
    assert token_f1("madrid madrid", "madrid") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_squad_metrics_over_examples():
    preds = ["en Madrid", "1819.", "los nazaríes", "nada"]
    refs = [["en Madrid", "Madrid"], ["1819"], ["la dinastía nazarí"], []]
    m = squad_metrics(preds, refs)
    # EM: 1, 1, 0 (the 4th has no reference and is not scored); F1: 1, 1, 0
    assert m == {"exact_match": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3), "examples": 3.0}
    m = squad_metrics(["el Museo del Prado"], [["Museo del Prado", "Prado"]], "mlqa")
    assert m["exact_match"] == 1.0 and m["f1"] == 1.0
    m = squad_metrics(["el Museo del Prado"], [["Museo del Prado", "Prado"]], "squad")
    # best of: [el museo del prado] vs [museo del prado]: P=3/4, R=1 -> 6/7; vs [prado]: 0.4
    assert m["exact_match"] == 0.0 and m["f1"] == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        squad_metrics(["a", "b"], [["a"]])


def test_answer_start_mismatch():
    context = "El Museo del Prado se encuentra en Madrid."
    assert not answer_start_mismatch(context, ["Madrid"], [35])
    assert answer_start_mismatch(context, ["Madrid"], [34])
    assert answer_start_mismatch(context, ["Prado", "Madrid"], [13, 30])


def test_seqeval_on_a_hand_made_example():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # gold entities PER, LOC, ORG; predicted PER, ORG, LOC(wrong place): 2 of 3 right each way
    m = seqeval_metrics(gold, pred)
    assert m == {"f1": pytest.approx(2 / 3), "precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3)}
    # a partially found entity is wrong as a whole
    m = seqeval_metrics([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-ORG", "O"]])
    assert m["f1"] == 0.0
    assert token_accuracy(gold, pred) == pytest.approx(4 / 6)


def test_seqeval_on_pos_tags_stays_quiet(recwarn):
    seqeval_metrics([["NOUN", "VERB"]], [["NOUN", "NOUN"]])
    assert not [w for w in recwarn if "NE tag" in str(w.message)]


def test_token_accuracy_checks_lengths_and_is_bio():
    with pytest.raises(ValueError, match="sentence 0: 2 gold tags but 1 predicted"):
        token_accuracy([["O", "O"]], [["O"]])
    assert token_accuracy([], []) == 0.0
    assert is_bio(["O", "B-PER", "I-PER", "S-LOC", "E-LOC"])
    assert not is_bio(["NOUN", "VERB", "O"])
