"""Model features for prompt tuning: lengths, truncation, order; rank-classification
candidates and gold labels (`prompt_jax.rank_classification`)."""

from __future__ import annotations

import json

import pytest
import seqio
from conftest import build_data_dir, shared_file
from prompt_jax.tasks import config

from prompt_jax import data, rank_classification, tasks

LENGTHS = {"inputs": 44, "targets": 8}
FEATURES = {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
            "decoder_loss_weights"}  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return build_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, data_dir):
    monkeypatch.setenv(config.VOCAB_ENV, str(shared_file("t5", "spiece.model")))
    monkeypatch.setenv(config.DATA_DIR_ENV, str(data_dir))


def _take(ds, n=None) -> list[dict]:
    return list((ds.take(n) if n else ds).as_numpy_iterator())


def test_inputs_length_is_the_text_budget():
    """TASK_FEATURE_LENGTHS['inputs'] counts text tokens only: the prompt comes on top."""
    shared_file("super_glue", "RTE", "val.jsonl")
    rows = _take(data.get_dataset("super_glue_rte", "validation", LENGTHS, shuffle=False,
                                  seed=None, num_epochs=1))  # fmt: skip
    assert len(rows) == 277
    ex = rows[0]
    assert set(ex) == FEATURES
    assert ex["encoder_input_tokens"].shape == (44,) and ex["decoder_target_tokens"].shape == (8,)
    # Example 0 is longer than 44 tokens: cut to 43, then EOS.
    vocab = tasks.get_vocabulary()
    full = vocab.encode(
        "rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of the "
        "actor Christopher Reeve, has died of lung cancer at age 44, according to the Christopher "
        "Reeve Foundation."
    )
    assert list(ex["encoder_input_tokens"]) == full[:43] + [1]
    target = vocab.encode("not_entailment") + [1]
    assert list(ex["decoder_target_tokens"]) == target + [0] * (8 - len(target))
    assert list(ex["decoder_input_tokens"]) == [0] + list(ex["decoder_target_tokens"][:-1])
    assert list(ex["decoder_loss_weights"]) == [1] * len(target) + [0] * (8 - len(target))


def test_lengths_are_checked():
    for bad in ({"inputs": 64}, {"inputs": 0, "targets": 8}, {"inputs": 64, "targets": "8"},
                [64, 8]):
        with pytest.raises(ValueError, match="TASK_FEATURE_LENGTHS"):
            data.get_dataset("glue_sst2", "validation", bad, shuffle=False, seed=None,
                             num_epochs=1)  # fmt: skip


def test_length_stats():
    shared_file("super_glue", "RTE", "val.jsonl")
    vocab = tasks.get_vocabulary()
    seen = data.length_stats("super_glue_rte", "validation", LENGTHS)
    # Cross-check with the files: inputs (plus EOS) longer than 44 tokens.
    lengths = [len(vocab.encode(s)) + 1 for s in _rte_validation_strings()]
    expected = sum(n > 44 for n in lengths)
    assert (seen.truncated, seen.total, seen.max_tokens) == (expected, 277, 44)
    assert seen.longest_inputs == max(lengths)
    assert seen.longest_targets == len(vocab.encode("not_entailment")) + 1
    assert str(seen) == f"{expected} of 277 inputs truncated to 44 tokens"


def _rte_validation_strings() -> list[str]:
    path = shared_file("super_glue", "RTE", "val.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [f"rte hypothesis: {r['hypothesis']} premise: {r['premise']}" for r in rows]


def test_same_seed_same_order_and_resume_by_skipping():
    def stream(seed):
        # Six epochs of QQP's two examples (num_epochs=None repeats the same way forever).
        return data.get_dataset("glue_qqp", "train", LENGTHS, shuffle=True, seed=seed,
                                num_epochs=6)  # fmt: skip

    first = [r["encoder_input_tokens"].tolist() for r in _take(stream(3), 12)]
    again = [r["encoder_input_tokens"].tolist() for r in _take(stream(3), 12)]
    resumed = [r["encoder_input_tokens"].tolist() for r in _take(stream(3).skip(5), 7)]
    assert first == again and resumed == first[5:]
    assert len({tuple(t) for t in first}) == 2  # two examples, repeated over epochs
    other = [r["encoder_input_tokens"].tolist() for r in _take(stream(4), 12)]
    assert other != first  # the seed changes the order


def test_mixture_dataset_and_count():
    rows = _take(data.get_dataset("super_glue_sentinel", "train", {"inputs": 108, "targets": 8},
                                  shuffle=False, seed=0, num_epochs=None), 10)  # fmt: skip
    assert len(rows) == 10 and all(set(r) == FEATURES for r in rows)
    assert all(r["encoder_input_tokens"].shape == (108,) for r in rows)
    assert {r["decoder_target_tokens"][0] for r in rows} == {32099}
    count = data.length_stats("super_glue", "validation", {"inputs": 412, "targets": 8})
    assert count.total == 277 + 104 + 2 + 2 + 2 + 6 + 3 + 2  # the eight validation splits


@pytest.mark.parametrize("name", ["glue_mrpc", "glue_mrpc_sentinel"])
def test_rank_classification_candidates_and_gold_labels(name):
    found = rank_classification.candidates(name, 8)
    vocab = tasks.get_vocabulary()
    prefix = [32099] if name.endswith("_sentinel") else []
    assert found.labels == ("not_equivalent", "equivalent")
    for label, row in zip(found.labels, found.tokens, strict=True):
        target = prefix + vocab.encode(label) + [1]
        assert list(row) == target + [0] * (8 - len(target))
    # Each candidate is the target the task itself produces for that label.
    rows = _take(data.get_dataset(name, "validation", LENGTHS, shuffle=False, seed=None,
                                  num_epochs=1))
    examples = _take(seqio.get_mixture_or_task(name).get_dataset(
        {"inputs": 44, "targets": 8}, split="validation", shuffle=False))
    gold = rank_classification.gold_labels(examples, found.labels)
    assert gold == {0: 1, 1: 0}  # dev.tsv: equivalent, then not_equivalent
    for i, label in gold.items():
        assert list(rows[i]["decoder_target_tokens"]) == list(found.tokens[label])


def test_long_labels_are_trimmed_as_the_targets_are():
    """The one rule: a candidate keeps L - 1 tokens then EOS, exactly as seqio trims the
    task's targets, so the gold candidate is the trained target at any length."""
    vocab = tasks.get_vocabulary()
    long = vocab.encode("not_equivalent")
    assert len(long) > 2
    found = rank_classification.candidates("glue_mrpc", 3)
    assert list(found.tokens[0]) == long[:2] + [1]
    row = _take(data.get_dataset("glue_mrpc", "validation", {"inputs": 44, "targets": 3},
                                 shuffle=False, seed=None, num_epochs=1))[1]
    assert list(row["decoder_target_tokens"]) == list(found.tokens[0])  # its gold label
    # At L = 1 every label trims to EOS alone: the labels cannot be told apart.
    assert rank_classification.candidates("glue_mrpc", 1) is None


def test_rank_classification_needs_labels():
    assert rank_classification.candidates("super_glue_record", 8) is None
    assert rank_classification.gold_label(b"<extra_id_0> equivalent",
                                          ("not_equivalent", "equivalent")) == 1
    assert rank_classification.gold_label(b"a referent", ("False", "True")) is None
