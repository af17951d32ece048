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


def test_init_labels_of_a_users_own_mixture_and_of_an_unknown_name():
    import prompt_jax.tasks  # noqa: F401  (registers the tasks the mixture names)
    import seqio

    seqio.MixtureRegistry.add("test_verbalizers_own", [("super_glue_rte", 1.0)])
    try:  # a user's mixture: no labels known (class-label init then says to set them)
        assert verbalizers.init_labels("test_verbalizers_own") is None
    finally:
        seqio.MixtureRegistry.remove("test_verbalizers_own")
    with pytest.raises(ValueError, match="'super_glue_rtee' is not a prompt_jax task"):
        verbalizers.init_labels("super_glue_rtee")  # a typo still fails, naming it


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


# ------------------------------------------------------------------ PET's loss in training

# The classes' own targets (what a labelled row's decoder_target_tokens spell), and a batch of
# three labelled rows (classes 2, 0, 1) and one row whose target is no class label.
LABEL_TOKENS = np.array([[60, 1, 0], [61, 62, 1], [63, 1, 0]], np.int32)
TARGETS = np.array([[63, 1, 0, 0], [60, 1, 0, 0], [61, 62, 1, 0], [70, 71, 72, 1]], np.int32)
GOLD = [2, 0, 1, -1]


def _pet_setup(tmp_path):
    from conftest import shift_right

    import prompt_jax

    hf = build_hf_model("t5_1_0_tied_relu", tmp_path)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    rng = np.random.default_rng(1)
    enc = padded_batch(rng, [9, 6, 11, 7], 11)
    prompt = rng.normal(size=(3, config.d_model)).astype(np.float32)
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(TARGETS),
             "decoder_target_tokens": TARGETS}
    pet = verbalizers.PetTargets(verbalizers.word_targets(WORDS, length=5), LABEL_TOKENS)
    tree = unflatten({**flatten(params), PROMPT_PATH: prompt})
    return hf, T5(config, prompt_length=3), tree, batch, pet, enc, prompt


def test_pet_term_is_the_hand_computed_cross_entropy_summed_over_labelled_rows(tmp_path):
    """objective(pet_weight=w) - objective(0) = w x Σ over labelled rows of
    -log softmax(class scores)[gold], the class scores computed by hand from HF's logits."""
    pytest.importorskip("torch")
    from prompt_jax import train_step

    hf, model, tree, batch, pet, enc, prompt = _pet_setup(tmp_path)
    np.testing.assert_array_equal(np.asarray(verbalizers.batch_labels(
        jnp.asarray(TARGETS), LABEL_TOKENS)), GOLD)
    ref = hf_word_log_likelihoods(hf, enc, prompt)
    classes = np.stack([ref[:, :2].max(1), ref[:, 2], ref[:, 3]], 1)
    ce = [-(classes[b, g] - np.log(np.exp(classes[b]).sum())) for b, g in enumerate(GOLD)
          if g >= 0]

    w = 2.5
    plain, m0 = train_step.compute_loss(model, tree, batch, train_step.LossConfig(), None)
    with_pet, m = train_step.compute_loss(model, tree, batch,
                                          train_step.LossConfig(pet_weight=w), None, pet)
    np.testing.assert_allclose(float(with_pet - plain), w * np.sum(ce), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(m["pet_loss"]), np.mean(ce), rtol=1e-4, atol=1e-5)
    assert float(m["pet_rows"]) == 3
    assert "pet_loss" not in m0
    # pet_weight 0 leaves the objective alone, verbalizer or not.
    off, _ = train_step.compute_loss(model, tree, batch, train_step.LossConfig(), None, pet)
    assert float(off) == float(plain)


def test_pet_step_microbatched_equals_one_batch(tmp_path):
    """With PET's loss on, 2 microbatches give the same prompt and pet_loss as one batch
    (the term is a sum over rows); and the step differs from one without it (the control)."""
    pytest.importorskip("torch")
    import jax

    from prompt_jax import optim, train_step

    _, model, tree, batch, pet, _, _ = _pet_setup(tmp_path)
    tx = optim.adafactor(learning_rate=0.3)
    trainable, frozen = optim.split_params(tree, optim.DEFAULT_TRAINABLE)

    def run(k, weight):
        step = jax.jit(train_step.make_train_step(
            model, tx, train_step.LossConfig(pet_weight=weight), num_microbatches=k, pet=pet))
        state, metrics = step(train_step.TrainState.create(trainable, tx), frozen,
                              jax.tree.map(jnp.asarray, batch))
        return np.asarray(flatten(state.trainable)[PROMPT_PATH]), metrics

    one, m1 = run(1, 1.0)
    two, m2 = run(2, 1.0)
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(m2["pet_loss"]), float(m1["pet_loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["objective"]), float(m1["objective"]), rtol=1e-5)
    without, _ = run(1, 0.0)
    assert np.abs(without - one).max() > 1e-4


def test_pet_weight_needs_a_verbalizer():
    from prompt_jax import data  # noqa: F401  (registers the tasks)

    with pytest.raises(ValueError, match="super_glue_rte has no verbalizer; bind "
                                         "verbalizer_words.words"):
        verbalizers.pet_targets("super_glue_rte", 8)
    gin.bind_parameter("verbalizer_words.words", {"super_glue_rte": (("yes",), ("no",))})
    pet = verbalizers.pet_targets("super_glue_rte", 8)
    assert pet.label_tokens.shape[0] == 2 and pet.words.num_classes == 2


def test_train_with_pet_and_eval_reports_verbalizer_accuracy(tmp_path, capsys):
    """`prompt-jax train` with LossConfig.pet_weight and a verbalizer logs pet_loss; its
    evals and `prompt-jax eval` report verbalizer_accuracy, which equals classifying the
    validation examples (read from seqio, not through the evaluator) by the words."""
    import json

    import seqio
    from conftest import run

    from prompt_jax import build, rank_classification
    from prompt_jax.model_dir import read_metrics

    model_dir = tmp_path / "run"
    words = "{'glue_sst2': (('bad', 'awful'), ('good',))}"  # the demo's task
    rc, out, err = run(capsys, "train", "--gin_file=demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
                       "--gin.TRAIN_STEPS=2", "--gin.EVAL_PERIOD=2", "--gin.train.log_period=1",
                       "--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
                       "--gin.BATCH_SIZE=4", "--gin.PROMPT_LENGTH=4",
                       "--gin.train.eval_examples=12", "--gin.LossConfig.pet_weight=1.0",
                       f"--gin.verbalizer_words.words={words}")
    assert rc == 0, err
    rows = read_metrics(str(model_dir))
    train_rows = [r for r in rows if not r.get("split")]
    assert train_rows and all(np.isfinite(r["pet_loss"]) and r["pet_rows"] > 0
                              for r in train_rows)
    assert "verbalizer_accuracy" in [r for r in rows if r.get("split")][-1]

    gin.clear_config()
    rc, out, err = run(capsys, "eval", f"--gin.MODEL_DIR='{model_dir}'",
                       "--gin.evaluate.eval_examples=12")
    assert rc == 0, err
    metrics = json.loads((model_dir / "eval_validation.json").read_text())["metrics"]

    # By hand: the run's random model and best prompt, the first 12 validation examples.
    config, frozen = build.load_frozen(build.ModelSpec(size="tiny", dropout_rate=0.0), None,
                                       str(model_dir), 0)
    prompt = np.load(model_dir / "best_prompt.npy")
    task = seqio.get_mixture_or_task("glue_sst2")
    examples = list(task.get_dataset({"inputs": 512, "targets": 8}, split="validation",
                                     shuffle=False).take(12).as_numpy_iterator())
    enc = np.zeros((12, max(len(e["inputs"]) for e in examples)), np.int32)
    for row, e in zip(enc, examples, strict=True):
        row[: len(e["inputs"])] = e["inputs"]
    labels = rank_classification.candidates("glue_sst2", 8).labels
    gold = [rank_classification.gold_label(e["targets_pretokenized"], labels)
            for e in examples]
    vocab = task.output_features["targets"].vocabulary
    targets = verbalizers.tokenize_words((("bad", "awful"), ("good",)), vocab, 8)
    choice, _ = verbalizers.classify(T5(config, prompt_length=4), unflatten(
        {**flatten(frozen), PROMPT_PATH: prompt}), jnp.asarray(enc), targets)
    by_hand = 100.0 * np.mean(np.asarray(choice) == np.asarray(gold))
    assert metrics["verbalizer_accuracy"] == pytest.approx(by_hand)
    assert "rank_accuracy" in metrics
