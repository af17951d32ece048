"""Prompt initializers and prompt files."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import shared_file

from prompt_jax import prompts

V, E = 6000, 16


@pytest.fixture
def embedding():
    return np.random.default_rng(0).normal(size=(V, E)).astype(np.float32)


class ToyVocab:
    """Whitespace 'tokenizer' with fixed ids, enough to check what the initializers embed."""

    ids = {"yes": [7], "no": [8], "not_entailment": [30, 31, 32], "hello": [40], "world": [41]}

    def encode(self, s):
        return [i for w in s.split() for i in self.ids[w]]


def test_random_uniform_range():
    p = np.asarray(prompts.random_uniform(0.5)(jax.random.PRNGKey(0), (100, E)))
    assert p.shape == (100, E) and p.min() >= -0.5 and p.max() <= 0.5 and p.std() > 0.2


def test_sampled_vocab_rows_are_table_rows_below_n(embedding):
    p = np.asarray(prompts.sampled_vocab(embedding, 5000)(jax.random.PRNGKey(1), (100, E)))
    ids = [int(np.flatnonzero((embedding == row).all(axis=1))[0]) for row in p]
    assert all(i < 5000 for i in ids)
    assert len(set(ids)) == 100  # drawn without replacement when P <= N


def test_sampled_vocab_with_replacement_when_prompt_longer_than_population(embedding):
    p = np.asarray(prompts.sampled_vocab(embedding, 3)(jax.random.PRNGKey(1), (10, E)))
    assert all(any((embedding[i] == row).all() for i in range(3)) for row in p)


def test_class_labels_rows_are_mean_subtoken_embeddings(embedding):
    init = prompts.class_labels(embedding, ToyVocab(), ["yes", "not_entailment"])
    p = np.asarray(init(jax.random.PRNGKey(2), (5, E)))
    np.testing.assert_allclose(p[0], embedding[7], rtol=1e-6)
    np.testing.assert_allclose(p[1], embedding[[30, 31, 32]].mean(axis=0), rtol=1e-6)
    # The rest come from the fallback: sampled vocab rows with id < 5000.
    for row in p[2:]:
        assert any((embedding[:5000] == row).all(axis=1))


def test_class_labels_more_labels_than_positions_keeps_the_first(embedding, caplog):
    init = prompts.class_labels(embedding, ToyVocab(), ["yes", "no", "hello"])
    p = np.asarray(init(jax.random.PRNGKey(0), (2, E)))
    np.testing.assert_allclose(p, embedding[[7, 8]], rtol=1e-6)
    assert "the last 1 are not used" in caplog.text


def test_from_string_rows_are_token_embeddings(embedding):
    init = prompts.from_string(embedding, ToyVocab(), "hello world not_entailment")
    p = np.asarray(init(jax.random.PRNGKey(3), (8, E)))
    np.testing.assert_array_equal(p[:5], embedding[[40, 41, 30, 31, 32]])


def test_prompt_file_round_trip_and_from_file(tmp_path):
    p = np.random.default_rng(0).normal(size=(5, E)).astype(np.float32)
    path = tmp_path / "p.npy"
    prompts.save_prompt(str(path), p)
    np.testing.assert_array_equal(prompts.load_prompt(str(path), (5, E)), p)
    np.testing.assert_array_equal(prompts.from_file(str(path))(None, (5, E)), p)


def test_released_prompt_loads_into_base_slot():
    path = shared_file("t5", "pretrained_prompts", "t5_1_1_lm100k_base", "rte.npy")
    prompt = prompts.load_prompt(str(path), (100, 768))
    assert prompt.dtype == np.float32 and np.isfinite(prompt).all()
    with pytest.raises(ValueError, match=r"rte.npy: prompt has shape \(100, 768\), expected "
                                         r"\(100, 512\)"):
        prompts.load_prompt(str(path), (100, 512))


def test_reference_test_prompt_loads():
    path = shared_file("t5", "prompt_5x256.npy")
    assert prompts.load_prompt(str(path), (5, 256)).shape == (5, 256)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((3, E), np.int32), "dtype int32, expected a float"),
    (np.array([[np.nan] * E] * 3, np.float32), "3 rows|48 NaN/inf"),
    (np.zeros((3, E, 1), np.float32), r"shape \(3, 16, 1\), expected \[P, E\]"),
])
def test_bad_prompt_files(tmp_path, bad, match):
    path = tmp_path / "bad.npy"
    np.save(path, bad)
    with pytest.raises(ValueError, match=match):
        prompts.load_prompt(str(path), (3, E))


def test_pickled_object_prompt_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled"):
        prompts.load_prompt(str(path), (1, E))


def test_not_a_npy_file(tmp_path):
    path = tmp_path / "notes.npy"
    path.write_text("hello")
    with pytest.raises(ValueError, match="notes.npy: not a .npy file"):
        prompts.load_prompt(str(path))
