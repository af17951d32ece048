"""Model features for prompt tuning: lengths, truncation, order, rank classification."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared_file
from prompt_jax.tasks import config
from test_tasks import build_data_dir  # the task tests' data directory

from prompt_jax import data, tasks

LENGTHS = {"inputs": 64, "targets": 8}
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


def test_features_leave_room_for_the_prompt():
    shared_file("super_glue", "RTE", "val.jsonl")
    rows = _take(data.get_dataset("super_glue_rte", "validation", LENGTHS, 20, shuffle=False,
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


def test_prompt_length_bounds():
    for bad in (-1, 64, 100):
        with pytest.raises(ValueError, match="prompt length"):
            data.get_dataset("glue_sst2", "validation", LENGTHS, bad, shuffle=False, seed=None,
                             num_epochs=1)  # fmt: skip
    with pytest.raises(ValueError, match="keys inputs and targets"):
        data.encoder_length({"inputs": 64}, 0)
    rows = _take(data.get_dataset("glue_sst2", "validation", LENGTHS, 0, shuffle=False, seed=None,
                                  num_epochs=1))  # fmt: skip
    assert rows[0]["encoder_input_tokens"].shape == (64,)  # model tuning: no prompt


def test_count_truncated():
    shared_file("super_glue", "RTE", "val.jsonl")
    vocab = tasks.get_vocabulary()
    seen = data.count_truncated("super_glue_rte", "validation", LENGTHS, 20)
    # Cross-check with the files: inputs (plus EOS) longer than 44 tokens.
    expected = sum(len(vocab.encode(s)) + 1 > 44 for s in _rte_validation_strings())
    assert (seen.truncated, seen.total, seen.max_tokens) == (expected, 277, 44)
    assert str(seen) == f"{expected} of 277 inputs truncated to 44 tokens"


def _rte_validation_strings() -> list[str]:
    path = shared_file("super_glue", "RTE", "val.jsonl")
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [f"rte hypothesis: {r['hypothesis']} premise: {r['premise']}" for r in rows]


def test_same_seed_same_order_and_resume_by_skipping():
    def stream(seed):
        # Six epochs of QQP's two examples (num_epochs=None repeats the same way forever).
        return data.get_dataset("glue_qqp", "train", LENGTHS, 10, shuffle=True, seed=seed,
                                num_epochs=6)  # fmt: skip

    first = [r["encoder_input_tokens"].tolist() for r in _take(stream(3), 12)]
    again = [r["encoder_input_tokens"].tolist() for r in _take(stream(3), 12)]
    resumed = [r["encoder_input_tokens"].tolist() for r in _take(stream(3).skip(5), 7)]
    assert first == again and resumed == first[5:]
    assert len({tuple(t) for t in first}) == 2  # two examples, repeated over epochs
    other = [r["encoder_input_tokens"].tolist() for r in _take(stream(4), 12)]
    assert other != first  # the seed changes the order


def test_mixture_dataset_and_count():
    rows = _take(data.get_dataset("super_glue_sentinel", "train", {"inputs": 128, "targets": 8},
                                  20, shuffle=False, seed=0, num_epochs=None), 10)  # fmt: skip
    assert len(rows) == 10 and all(set(r) == FEATURES for r in rows)
    assert all(r["encoder_input_tokens"].shape == (108,) for r in rows)
    assert {r["decoder_target_tokens"][0] for r in rows} == {32099}
    count = data.count_truncated("super_glue", "validation", {"inputs": 512, "targets": 8}, 100)
    assert count.total == 277 + 104 + 2 + 2 + 2 + 6 + 3 + 2  # the eight validation splits


@pytest.mark.parametrize("name", ["glue_mrpc", "glue_mrpc_sentinel"])
def test_rank_classification(name):
    rows = _take(data.rank_classification_examples(name, "validation", LENGTHS, 20))
    vocab = tasks.get_vocabulary()
    prefix = [32099] if name.endswith("_sentinel") else []
    assert [(r["example_id"], r["label_index"], r["is_correct"]) for r in rows] == [
        (0, 0, False),
        (0, 1, True),
        (1, 0, True),
        (1, 1, False),
    ]  # dev.tsv: equivalent, then not_equivalent
    for r in rows:
        label = ("not_equivalent", "equivalent")[r["label_index"]]
        target = prefix + vocab.encode(label) + [1]
        assert list(r["decoder_target_tokens"]) == target + [0] * (8 - len(target))
        assert r["encoder_input_tokens"].shape == (44,)
    assert np.array_equal(rows[0]["encoder_input_tokens"], rows[1]["encoder_input_tokens"])
    scores = [-3.0, -1.0, -0.5, -2.0]
    picked = data.rank_classification_predictions(
        [r["example_id"] for r in rows], [r["label_index"] for r in rows], scores
    )
    assert picked == {0: 1, 1: 0}


def test_rank_classification_needs_labels():
    with pytest.raises(ValueError, match="no fixed label strings"):
        data.rank_classification_examples("super_glue_record", "validation", LENGTHS, 20)
