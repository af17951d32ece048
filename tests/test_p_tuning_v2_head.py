"""P-tuning v2's classification head (methods/p_tuning_v2_head.gin): its logits are the
mean-pooled encoder outputs through a linear layer, computed by hand here; its loss is the
cross-entropy of each labelled row's class, by hand, with microbatches adding up to the
batch; it trains with the prefixes while T5 stays frozen; its files hold the head, and eval
and infer classify with it (never without it), infer's predictions the same as eval's; serve
refuses such files; bad files and settings fail naming the file or setting.
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DEMO, assert_one_line_error, run, shift_right, tiny_config, train_args

from prompt_jax import optim, train_step
from prompt_jax.methods import deep_prompts
from prompt_jax.methods.deep_prompts import DeepPromptSpec
from prompt_jax.t5.model import T5

CONFIG = tiny_config(d_model=64, d_kv=16, num_heads=4, d_ff=80, vocab_size=128)
SPEC = DeepPromptSpec("p_tuning_v2", 3, classification_head=True, num_classes=2)
LABELS = np.array([[10, 11, 1], [12, 1, 0]], np.int32)  # two classes' label targets [C, L]


def _batch(rng, n=6, length=12):
    enc = rng.integers(20, 128, (n, length)).astype(np.int32)
    enc[:, -1] = 1
    enc[1, 6:] = 0  # a padded row
    tgt = np.stack([LABELS[i % 2] for i in range(n)])
    tgt[-1] = [13, 1, 0]  # a row whose target is no label: not counted
    return {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt),
            "decoder_target_tokens": tgt}


def _model(spec=SPEC):
    model = T5(CONFIG, deep_prompt_spec=spec)
    b = _batch(np.random.default_rng(0))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), b["encoder_input_tokens"],
                                          b["decoder_input_tokens"])["params"])
    # The head is trained from a random start (the reference's N(0, 0.02)); move it off
    # that so that the checks below see a head that matters.
    params["deep_prompt"]["head_bias"] = np.array([0.3, -0.2], np.float32)
    return model, params


def _hand_logits(model, params, tokens):
    encoded, mask = model.apply({"params": params}, tokens, method=T5.encode)
    encoded, mask = np.asarray(encoded, np.float64), np.asarray(mask)
    pooled = np.stack([encoded[b][mask[b] > 0].mean(0) for b in range(len(tokens))])
    head = params["deep_prompt"]
    return pooled @ np.asarray(head["head_kernel"], np.float64) + np.asarray(head["head_bias"])


def test_head_logits_are_the_mean_of_the_real_positions_through_the_head():
    model, params = _model()
    assert params["deep_prompt"]["head_kernel"].shape == (64, 2)
    tokens = _batch(np.random.default_rng(1))["encoder_input_tokens"]
    ours = np.asarray(model.apply({"params": params}, tokens, method=T5.classify))
    np.testing.assert_allclose(ours, _hand_logits(model, params, tokens), atol=1e-5)
    # Control: the prefixes reach the head (other prefixes, other logits).
    moved = {**params, "deep_prompt": {**params["deep_prompt"],
                                       "embedding": params["deep_prompt"]["embedding"] + 1.0}}
    assert np.abs(np.asarray(model.apply({"params": moved}, tokens, method=T5.classify))
                  - ours).max() > 1e-3


def test_head_loss_is_the_labelled_rows_cross_entropy_and_microbatches_add_up():
    model, params = _model()
    batch = _batch(np.random.default_rng(2))
    objective, metrics = train_step.compute_loss(model, params, batch, train_step.LossConfig(),
                                                 None, head_labels=LABELS)
    logits = _hand_logits(model, params, batch["encoder_input_tokens"])
    gold = np.array([0, 1, 0, 1, 0])  # the last row spells no label
    logp = logits[:5] - np.logaddexp.reduce(logits[:5], axis=-1, keepdims=True)
    want = -logp[np.arange(5), gold].sum()
    assert float(objective) == pytest.approx(want, rel=1e-5)
    assert float(metrics["num_tokens"]) == 5 and float(metrics["z_loss"]) == 0
    assert float(metrics["loss"]) == pytest.approx(want / 5, rel=1e-5)
    assert float(metrics["token_accuracy"]) == pytest.approx(
        np.mean(logits[:5].argmax(-1) == gold))

    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    assert set(optim.flatten(trainable)) == {"deep_prompt/embedding", "deep_prompt/head_kernel",
                                             "deep_prompt/head_bias"}
    tx = optim.adafactor(multiply_by_parameter_scale=True)
    state = train_step.TrainState.create(trainable, tx)
    out = {}
    for k in (1, 2):
        step = jax.jit(train_step.make_train_step(model, tx, num_microbatches=k,
                                                  head_labels=LABELS))
        out[k] = step(state, frozen, {k_: jnp.asarray(v) for k_, v in batch.items()})
    for name in ("loss", "objective", "num_tokens", "token_accuracy", "grad_norm"):
        assert float(out[2][1][name]) == pytest.approx(float(out[1][1][name]), rel=1e-5), name
    for path, value in optim.flatten(out[1][0].trainable).items():
        np.testing.assert_allclose(np.asarray(value),
                                   np.asarray(optim.flatten(out[2][0].trainable)[path]),
                                   atol=1e-6, err_msg=path)
        assert not np.allclose(np.asarray(value), np.asarray(optim.flatten(trainable)[path]))


def _head_file(tmp_path, edit=None):
    """A head file of `_model()`'s deep prompt (its arrays changed by `edit(arrays)`)."""
    model, params = _model()
    matrix = deep_prompts.deep_prompt_matrix(SPEC, CONFIG, params["deep_prompt"])
    path = tmp_path / "d.npz"
    deep_prompts.save_deep_prompt(str(path), SPEC, CONFIG, matrix,
                                  head=deep_prompts.head_of(SPEC, params["deep_prompt"]))
    if edit is not None:
        with np.load(path) as f:
            arrays = dict(f)
        edit(arrays)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return path, model, params


def test_head_files_hold_the_head_and_load_with_it(tmp_path):
    path, model, params = _head_file(tmp_path)
    with np.load(path) as f:
        np.testing.assert_array_equal(f["head_kernel"], params["deep_prompt"]["head_kernel"])
        np.testing.assert_array_equal(f["head_bias"], params["deep_prompt"]["head_bias"])
    spec, matrix, head = deep_prompts.load_deep_prompt(str(path), CONFIG)
    assert spec == dataclasses.replace(SPEC, layers=(0, 1))  # head True, num_classes 2
    # The loaded model classifies as the trained one does, against the logits by hand.
    loaded = T5(CONFIG, deep_prompt_spec=spec)
    flat = deep_prompts.with_matrix(
        {k: v for k, v in optim.flatten(params).items() if not k.startswith("deep_prompt/")},
        matrix, head)
    tokens = _batch(np.random.default_rng(1))["encoder_input_tokens"]
    logits = loaded.apply({"params": optim.unflatten(flat)}, tokens, method=T5.classify)
    np.testing.assert_allclose(np.asarray(logits), _hand_logits(model, params, tokens),
                               atol=1e-5)
    with pytest.raises(ValueError, match=r"refusing to save a head of shapes \(64, 3\)"):
        deep_prompts.save_deep_prompt(str(path), SPEC, CONFIG, matrix,
                                      head=(np.zeros((64, 3)), np.zeros(3)))
    with pytest.raises(ValueError, match="classification head's weights go with"):
        deep_prompts.save_deep_prompt(str(path), SPEC, CONFIG, matrix)


def _set(name, value):
    return lambda arrays: arrays.__setitem__(name, value)


def _nan_kernel(arrays):
    arrays["head_kernel"] = arrays["head_kernel"].copy()
    arrays["head_kernel"][3, 1] = np.nan


HEAD_FILE_REFUSALS = [
    (lambda a: a.pop("head_bias"), r"d.npz: head_kernel without head_bias"),
    (lambda a: a.pop("head_kernel"), r"d.npz: head_bias without head_kernel"),
    (_set("head_kernel", np.zeros((32, 2), np.float32)),
     r"d.npz: head_kernel has shape \(32, 2\), expected \(64, C\)"),
    (_set("head_kernel", np.zeros((64, 1), np.float32)), r"C >= 2 classes"),
    (_set("head_bias", np.zeros(3, np.float32)),
     r"d.npz: head_bias has shape \(3,\), expected \(2,\)"),
    (_nan_kernel, r"d.npz: head_kernel holds 1 NaN/inf values"),
    (_set("method", np.array("prefix_tuning")), r"classification head with method prefix_tuning"),
]


@pytest.mark.parametrize("edit, match", HEAD_FILE_REFUSALS)
def test_damaged_head_files_are_refused_naming_the_field(tmp_path, edit, match):
    path, _, _ = _head_file(tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        deep_prompts.load_deep_prompt(str(path), CONFIG)


@pytest.mark.parametrize("fields, match", [
    (dict(method="prefix_tuning", classification_head=True),
     "classification_head is P-tuning v2's"),
    (dict(num_classes=2), "num_classes=2: the head's class count"),
    (dict(classification_head=True, num_classes=1), "num_classes=1"),
    (dict(classification_head="yes"), "classification_head must be True or False"),
])
def test_head_spec_refusals(fields, match):
    with pytest.raises(ValueError, match=match):
        DeepPromptSpec(**fields)


def test_head_needs_a_classification_task():
    import prompt_jax.tasks  # noqa: F401  (registers the tasks)

    spec = DeepPromptSpec(classification_head=True)
    assert spec.with_classes("glue_sst2").num_classes == 2
    assert spec.with_classes("super_glue_cb").num_classes == 3
    assert DeepPromptSpec().with_classes("span_corruption") == DeepPromptSpec()
    with pytest.raises(ValueError, match="span_corruption has no class labels"):
        spec.with_classes("span_corruption")
    with pytest.raises(ValueError, match="num_classes is not set"):
        _model(spec)


def test_head_run_on_the_demo_then_eval_and_infer_classify_with_its_head(tmp_path, capsys):
    """`prompt-jax train` with methods/p_tuning_v2_head.gin on the bundled SST-2 slice: the
    eval lines carry the head's accuracy and loss (what best.json keeps), the files hold the
    head. `prompt-jax eval` of the run's best file gives best.json's numbers; `infer` writes
    the head's classes with their log-probabilities, whose accuracy is eval's; a task with
    another class count and `serve` are refused in one line; PET beside the head is refused
    before anything is written."""
    run_dir = tmp_path / "run"
    settings = [*DEMO, "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 4}"]
    command, *args = train_args(run_dir, 4, 2, settings)
    rc, _, err = run(capsys, command, "--gin_file=demo.gin",
                     "--gin_file=methods/p_tuning_v2_head.gin", *args)
    assert rc == 0, err
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if line.get("split") == "validation"]
    assert [e["step"] for e in evals] == [2, 4]
    assert all(set(e) == {"step", "split", "head_accuracy", "loss"} for e in evals)
    best = json.loads((run_dir / "best.json").read_text())
    assert best["metrics"]["loss"] == min(e["loss"] for e in evals)
    with np.load(run_dir / "best_deep_prompt.npz") as f:
        assert f["head_kernel"].shape == (64, 2) and f["head_bias"].shape == (2,)

    rc, out, err = run(capsys, "eval", "--gin_file=demo_eval.gin", *DEMO[1:],
                       f"--gin.MODEL_DIR='{run_dir}'", "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'")
    assert rc == 0, err
    measured = json.loads((run_dir / "eval_validation.json").read_text())["metrics"]
    assert set(measured) == {"head_accuracy", "loss"}, measured
    for name in ("head_accuracy", "loss"):
        assert measured[name] == pytest.approx(best["metrics"][name], rel=1e-6), name

    rc, out, err = run(capsys, "infer", "--gin_file=demo_infer.gin",
                       f"--gin.MODEL_DIR='{run_dir}'", "--gin.MIXTURE_OR_TASK_NAME='glue_sst2'",
                       "--gin.infer.max_examples=24")
    assert rc == 0, err
    records = [json.loads(line) for line in
               (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 24
    for r in records:
        probs = r["class_log_probs"]
        assert set(probs) == {"negative", "positive"} and r["prediction"] in probs
        assert r["score"] == max(probs.values()) == probs[r["prediction"]]
        assert np.logaddexp.reduce(list(probs.values())) == pytest.approx(0.0, abs=1e-9)
    accuracy = 100.0 * np.mean([r["prediction"] == r["targets"] for r in records])
    assert accuracy == pytest.approx(measured["head_accuracy"], abs=1e-9)
    assert f"glue_sst2 validation: accuracy={accuracy:.4g}" in out

    rc, _, err = run(capsys, "eval", "--gin_file=demo_eval.gin", f"--gin.MODEL_DIR='{run_dir}'",
                     "--gin.MIXTURE_OR_TASK_NAME='super_glue_cb'")
    assert_one_line_error(rc, err, r"best_deep_prompt.npz: a classification head of 2 classes; "
                                   r"super_glue_cb has 3")
    rc, _, err = run(capsys, "serve", "--gin_file=demo_serve.gin", f"--gin.MODEL_DIR='{run_dir}'")
    assert_one_line_error(rc, err, "best_deep_prompt.npz: a P-tuning v2 deep prompt with a "
                                   "classification head")

    pet_dir = tmp_path / "pet"
    command, *args = train_args(pet_dir, 2, 2, settings)
    rc, _, err = run(capsys, command, "--gin_file=demo.gin",
                     "--gin_file=methods/p_tuning_v2_head.gin", *args,
                     "--gin.verbalizer_words.words={'glue_sst2': (('bad',), ('good',))}",
                     "--gin.LossConfig.pet_weight=1.0")
    assert_one_line_error(rc, err, "pet_weight > 0 with DeepPromptSpec.classification_head")
    assert not (pet_dir / "checkpoints").exists()
