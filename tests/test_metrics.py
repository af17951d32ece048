"""Metrics and postprocessors on hand-made predictions, with answers computed by hand."""

from __future__ import annotations

import pytest
import seqio
from prompt_jax.tasks import metrics, postprocessors

from prompt_jax import tasks  # noqa: F401  (registers the tasks)


def test_accuracy_counts_invalid_as_wrong():
    assert metrics.accuracy([0, 1, 1, 0], [0, 1, 0, -1]) == {"accuracy": 50.0}
    with pytest.raises(ValueError, match="2 targets but 3 predictions"):
        metrics.accuracy([0, 1], [0, 1, 1])


def test_f1_of_the_positive_class():
    # Invalid (-1) against target 1 becomes 0: tp=1, fp=1, fn=2 -> 2/(2+1+2).
    assert metrics.f1_binary([1, 1, 0, 0, 1], [1, 0, 1, 0, -1]) == {"f1": pytest.approx(40.0)}
    assert metrics.f1_binary([0, 0], [0, 0]) == {"f1": 0.0}
    assert metrics.f1_binary([1, 0], [1, 0]) == {"f1": 100.0}


def test_cb_macro_f1():
    # Per class: 0: tp1 fp1 fn1 -> 1/2; 1: tp1 fp1 fn1 -> 1/2; 2: tp1 fp0 fn1 -> 2/3.
    t, p = [0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 0, -1]
    assert metrics.mean_3class_f1(t, p) == {"mean_3class_f1": pytest.approx(100 * (5 / 3) / 3)}
    assert metrics.accuracy(t, p) == {"accuracy": 50.0}


def test_matthews_correlation():
    # tp=2 tn=2 fp=1 fn=1 -> (4 - 1) / sqrt(3^4) = 1/3.
    t = [1, 1, 1, 0, 0, 0]
    assert metrics.matthews_corrcoef(t, [1, 1, 0, 0, 0, 1]) == {
        "matthews_corrcoef": pytest.approx(100 / 3)
    }
    # An invalid prediction counts as the wrong class: the same as predicting 0 at index 2.
    assert metrics.matthews_corrcoef(t, [1, 1, -1, 0, 0, 1])["matthews_corrcoef"] == pytest.approx(
        100 / 3
    )
    assert metrics.matthews_corrcoef(t, [1] * 6) == {"matthews_corrcoef": 0.0}
    assert metrics.matthews_corrcoef(t, [0, 0, 0, 1, 1, 1])["matthews_corrcoef"] == pytest.approx(
        -100
    )


def test_multirc_f1a_and_exact_match():
    groups = [(0, 0), (0, 0), (0, 1), (1, 2), (1, 2)]
    t = [{"value": v, "group": g} for v, g in zip([1, 0, 1, 0, 0], groups, strict=True)]
    p = [{"value": v} for v in [1, 0, 0, 0, 1]]
    # Over answers: tp=1 fp=1 fn=1 -> 1/2. Per question: only (0, 0) all right -> 1/3.
    assert metrics.multirc_f1a(t, p) == {"f1a": pytest.approx(50.0)}
    assert metrics.multirc_exact_match(t, p) == {"exact_match": pytest.approx(100 / 3)}


def test_record_max_over_gold_answers():
    t = [
        {"value": ["the Cat", "Kitty"], "group": (0, 0)},
        {"value": ["the Cat", "Kitty"], "group": (0, 0)},  # the same query again: ignored
        {"value": ["New York City"], "group": (0, 1)},
        {"value": ["Barack Obama", "Obama"], "group": (1, 2)},
    ]
    p = [
        {"value": "cat."},
        {"value": "dog"},
        {"value": "York"},
        {"value": "President Barack Obama"},
    ]
    # F1: 1; york vs new york city: P=1 R=1/3 -> 1/2; P=2/3 R=1 -> 4/5 (beats 1/2 for Obama).
    out = metrics.record_f1_em(t, p)
    assert out == {"f1": pytest.approx(100 * (1 + 0.5 + 0.8) / 3),
                   "exact_match": pytest.approx(100 / 3)}  # fmt: skip


def test_squad_normalization():
    assert metrics.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert metrics.normalize_answer("An apple a day") == "apple day"
    assert metrics.normalize_answer("theater") == "theater"


def test_axg_parity_and_accuracy():
    t = [{"value": v, "group": g} for v, g in [(1, 0), (1, 0), (0, 1), (0, 1)]]
    p = [{"value": v} for v in [1, 0, 0, 0]]
    assert metrics.gender_parity(t, p) == {"gender_parity": 50.0}
    assert metrics.axg_accuracy(t, p) == {"accuracy": 75.0}


def test_superglue_score_as_the_leaderboard():
    # T5-11B's test results on the leaderboard, whose score is 89.3.
    scores = {
        "super_glue_boolq": {"accuracy": 91.2},
        "super_glue_cb": {"mean_3class_f1": 93.9, "accuracy": 96.8},
        "copa": {"accuracy": 94.8},
        "super_glue_multirc_sentinel": {"f1a": 88.1, "exact_match": 63.3},
        "super_glue_record": {"f1": 94.1, "exact_match": 93.4},
        "super_glue_rte": {"accuracy": 92.5},
        "super_glue_wic": {"accuracy": 76.9},
        "super_glue_wsc": {"accuracy": 93.8},
        "super_glue_axb": {"matthews_corrcoef": 65.6},  # diagnostics are not in the score
    }
    assert tasks.superglue_score(scores) == pytest.approx(714.0 / 8)
    del scores["super_glue_wic"]
    with pytest.raises(ValueError, match=r"missing \['wic'\]"):
        tasks.superglue_score(scores)


def test_task_metric_fns():
    get = lambda name: seqio.get_mixture_or_task(name).metric_fns
    assert get("super_glue_cb") == [metrics.mean_3class_f1, metrics.accuracy]
    assert get("super_glue_cb_sentinel") == get("super_glue_cb")
    assert get("glue_qqp") == [metrics.f1_binary, metrics.accuracy]
    assert get("super_glue_axb") == [metrics.matthews_corrcoef]
    assert get("span_corruption") == []
    # seqio sees them as prediction metrics (arguments `targets, predictions`).
    assert seqio.get_mixture_or_task("super_glue_multirc").predict_metric_fns == [
        metrics.multirc_f1a,
        metrics.multirc_exact_match,
    ]


def test_postprocessors():
    rte = postprocessors.class_id(("entailment", "not_entailment"))
    assert rte("not_entailment") == 1 and rte(b"entailment") == 0 and rte("maybe") == -1
    ex = {"idx/paragraph": 3, "idx/question": 7, "answers": [b"Paris", b"paris"],
          "idx/passage": 1, "idx/query": 2, "idx": 5}  # fmt: skip
    assert postprocessors.multirc("True", example=ex, is_target=True) == {
        "value": 1,
        "group": (3, 7),
    }
    assert postprocessors.multirc("yes") == {"value": -1}
    assert postprocessors.record("x", example=ex, is_target=True) == {
        "value": ["Paris", "paris"],
        "group": (1, 2),
    }
    assert postprocessors.record("Paris") == {"value": "Paris"}
    assert postprocessors.axg("entailment", example=ex, is_target=True) == {"value": 0, "group": 2}


def test_wsc_postprocessor():
    ex = {"targets_pretokenized": b"the pony", "label": 1}
    post = postprocessors.wsc_simple
    assert post("anything", example=ex, is_target=True) == 1
    assert post("The pony", example=ex) == 1  # case and determiners ignored
    assert post("pony", example=ex) == 1
    assert post("the small pony", example=ex) == 1  # one word set holds the other
    assert post("the boy", example=ex) == 0
    assert post("the pony's", example=ex) == 0  # possessive on one side only
    assert post("the", example=ex) == -1  # nothing left: wrong whatever the label


def test_strip_sentinel():
    rte = postprocessors.strip_sentinel(postprocessors.class_id(("entailment", "not_entailment")))
    assert rte("<extra_id_0> not_entailment") == 1
    assert rte("<extra_id_0>entailment") == 0
    assert rte("entailment") == 0  # no sentinel: left as is
    assert postprocessors.strip_sentinel(None)("<extra_id_0> free text") == "free text"
