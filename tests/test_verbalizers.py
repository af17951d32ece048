"""Verbalizers: word and class scores equal log-likelihoods computed by hand from HF's
PyTorch T5 logits, the PET loss equals its hand-computed cross-entropy, label words
tokenize as targets, and the binding feeds class-label initialisation."""

from __future__ import annotations

import gin
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, padded_batch

from prompt_jax.methods import verbalizers
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import PROMPT_PATH, T5

# Per class its words' token ids: multi-token words, a class of two words, one-token words.
WORDS = [[[5, 9], [17]], [[23, 4, 8]], [[30]]]


def hf_word_log_likelihoods(hf, enc: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """[B, W]: each word's mean log p per target token (word ids, then EOS), by hand."""
    import torch

    embeds = hf.get_input_embeddings()(torch.tensor(enc, dtype=torch.long)).detach()
    embeds = torch.cat([torch.tensor(prompt)[None].expand(len(enc), -1, -1), embeds], 1)
    mask = torch.cat([torch.ones(len(enc), len(prompt), dtype=torch.bool),
                      torch.tensor(enc > 0)], 1)
    out = []
    for class_words in WORDS:
        for word in class_words:
            target = [*word, 1]
            dec = torch.tensor([[0, *target[:-1]]] * len(enc))
            with torch.no_grad():
                logp = torch.log_softmax(hf(inputs_embeds=embeds, attention_mask=mask,
                                            decoder_input_ids=dec).logits.double(), -1)
            total = sum(logp[:, i, t] for i, t in enumerate(target))
            out.append((total / len(target)).numpy())
    return np.stack(out, 1)


def test_scores_equal_hand_computed_log_likelihoods(tmp_path):
    pytest.importorskip("torch")
    import prompt_jax

    hf = build_hf_model("t5_1_0_tied_relu", tmp_path)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    rng = np.random.default_rng(0)
    enc = padded_batch(rng, [9, 6, 11], 11)
    prompt = rng.normal(size=(3, config.d_model)).astype(np.float32)
    ref = hf_word_log_likelihoods(hf, enc, prompt)

    targets = verbalizers.word_targets(WORDS, length=5)
    np.testing.assert_array_equal(targets.tokens, [[5, 9, 1, 0, 0], [17, 1, 0, 0, 0],
                                                   [23, 4, 8, 1, 0], [30, 1, 0, 0, 0]])
    np.testing.assert_array_equal(targets.word_class, [0, 0, 1, 2])
    model = T5(config, prompt_length=3)
    tree = unflatten({**flatten(params), PROMPT_PATH: prompt})
    words = np.asarray(verbalizers.word_scores(model, tree, enc, targets))
    np.testing.assert_allclose(words, ref, atol=1e-4, rtol=1e-4)
    choice, scores = verbalizers.classify(model, tree, enc, targets)
    by_class = np.stack([ref[:, :2].max(1), ref[:, 2], ref[:, 3]], 1)  # max over the words
    np.testing.assert_allclose(np.asarray(scores), by_class, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(choice), by_class.argmax(1))
    # The control: a total (not mean) log-likelihood is another score.
    assert np.abs(words[:, 2] * 4 - ref[:, 2]).max() > 1e-2


def test_pet_loss_is_the_cross_entropy_over_class_scores():
    scores = np.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -2.0], [0.0, 0.0, 0.0]], np.float32)
    labels = np.array([2, 0, -1])  # the last row is unlabelled
    by_hand = []
    for row, gold in zip(scores[:2], labels[:2], strict=True):
        by_hand.append(-(row[gold] - np.log(np.exp(row).sum())))
    np.testing.assert_allclose(float(verbalizers.pet_loss(jnp.asarray(scores),
                                                          jnp.asarray(labels))),
                               np.mean(by_hand), rtol=1e-6)


def test_label_words_tokenize_as_targets():
    from prompt_jax.tasks import get_vocabulary

    vocab = get_vocabulary()
    words = [("yes", "true"), ("not entailment",)]
    got = verbalizers.tokenize_words(words, vocab, length=3, sentinel=True)
    rows = [[32099, *vocab.encode(w)][:2] + [1] for ws in words for w in ws]
    expected = np.zeros((3, 3), np.int32)
    for i, row in enumerate(rows):
        expected[i, :len(row)] = row
    np.testing.assert_array_equal(got.tokens, expected)
    np.testing.assert_array_equal(got.word_class, [0, 0, 1])


def test_binding_feeds_class_label_initialisation():
    assert verbalizers.init_labels("super_glue_rte") == ("entailment", "not_entailment")
    gin.bind_parameter("verbalizer_words.words",
                       {"super_glue_rte": (("yes", "true"), ("no",))})
    assert verbalizers.words_for("taskless_super_glue_rte_sentinel") == (("yes", "true"),
                                                                          ("no",))
    assert verbalizers.init_labels("super_glue_rte") == ("yes", "no", "true")
    gin.bind_parameter("verbalizer_words.words", {"super_glue_cb": (("yes",), ("no",))})
    with pytest.raises(ValueError, match=r"\['super_glue_cb'\]: 2 classes, but the task has 3"):
        verbalizers.words_for("super_glue_cb")
    gin.bind_parameter("verbalizer_words.words", {"super_glue_cb": ("yes", "no", "maybe")})
    with pytest.raises(ValueError, match="expected per class a tuple of non-empty word"):
        verbalizers.words_for("super_glue_cb")
