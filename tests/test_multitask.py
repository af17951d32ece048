"""Multi-task prompts (methods/multitask.py): the combine modes by hand, a mixed-task batch
against each task alone with its combined prompt, no weight gradients, the saved per-task
prompts, the mixture's data with task indices, and a train run on a 2-task mixture."""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from prompt_jax import losses, optim, prompts, serving, train_step
from prompt_jax.methods import multitask
from prompt_jax.methods.deep_prompts import DeepPromptSpec
from prompt_jax.methods.multitask import MultitaskPrompts, MultitaskT5
from prompt_jax.t5 import T5

NAMES = ("task_a", "task_b", "task_c")
# d_ff differs from every other size so that MLP weight gradients are recognisable in HLO.
CONFIG = tiny_config(d_model=64, d_kv=16, d_ff=80)


def make_model(mode="concat", shared=3, lengths=(2, 5, 0), config=CONFIG, deep=None):
    return MultitaskT5(config, task_names=NAMES, shared_length=shared, task_lengths=lengths,
                       mode=mode, deep_prompt_spec=deep)


def init(model, seed=0):
    tokens = jnp.ones((1, 4), jnp.int32)
    params = model.init(jax.random.PRNGKey(seed), tokens, tokens)["params"]
    return flax.linen.unbox(params)


def batch(rng, task_index, length=9, targets=4):
    n = len(task_index)
    enc = rng.integers(2, CONFIG.vocab_size, (n, length)).astype(np.int32)
    for row in range(n):  # different input lengths: EOS then padding
        cut = length - row % 3
        enc[row, cut - 1], enc[row, cut:] = 1, 0
    tgt = rng.integers(2, CONFIG.vocab_size, (n, targets)).astype(np.int32)
    tgt[:, -1] = 1
    dec = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt, "task_index": np.asarray(task_index, np.int32)}


def by_hand(params, mode):
    """Each task's combined prompt from the parameters with numpy, as the docstring says."""
    flat = optim.flatten(params)
    shared = np.asarray(flat.get("multitask_prompt/shared/prompt", np.zeros((0, 64))))
    out = {}
    for name in NAMES:
        own = np.asarray(flat.get(f"multitask_prompt/{name}/prompt", np.zeros((0, 64))))
        out[name] = shared + own if mode == "add" else np.concatenate([shared, own])
    return out


def test_parameters_are_the_shared_and_per_task_prompts():
    params = init(make_model())
    shapes = {k: v.shape for k, v in optim.flatten(params).items() if "multitask" in k}
    assert shapes == {"multitask_prompt/shared/prompt": (3, 64),
                      "multitask_prompt/task_a/prompt": (2, 64),
                      "multitask_prompt/task_b/prompt": (5, 64)}  # task_c: shared alone
    trainable, _ = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    assert set(optim.flatten(trainable)) == set(shapes)


def test_combine_modes_by_hand():
    shared = np.arange(6, dtype=np.float32).reshape(3, 2)
    task = 10 * np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(multitask.combine(shared, task, "add"),
                                  [[0, 11], [22, 33], [44, 55]])
    np.testing.assert_array_equal(multitask.combine(shared, task[:1], "concat"),
                                  [[0, 1], [2, 3], [4, 5], [0, 10]])
    np.testing.assert_array_equal(multitask.combine(None, task[:1], "concat"), [[0, 10]])
    np.testing.assert_array_equal(multitask.combine(shared[:1], None, "concat"), [[0, 1]])


@pytest.mark.parametrize("mode,lengths", [("concat", (2, 5, 0)), ("add", (3, 3, 3))])
def test_combined_prompts_and_packing(mode, lengths):
    model = make_model(mode, 3, lengths)
    params = init(model)
    want = by_hand(params, mode)
    got = multitask.combined_prompts(params, model)
    for name in NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    packed, mask = model.apply({"params": params}, method=lambda m: m.multitask_prompt())
    ref_packed, ref_mask = serving.pack_prompts([want[n] for n in NAMES])
    np.testing.assert_array_equal(packed, ref_packed)
    np.testing.assert_array_equal(mask, ref_mask)


def alone_log_likelihood(params, prompt, b, row, deep=None):
    """Row `row` of batch `b` through a plain T5 whose own prompt is `prompt` (and the
    deep prompt `deep` of `params`)."""
    model = T5(CONFIG, prompt_length=prompt.shape[0], deep_prompt_spec=deep)
    one = {k: v[row:row + 1] for k, v in b.items() if k != "task_index"}
    tree = multitask.single_task_params(params, jnp.asarray(prompt))
    logits = model.apply({"params": tree}, one["encoder_input_tokens"],
                         one["decoder_input_tokens"], one["decoder_target_tokens"])
    return logits[0], losses.per_example_log_likelihood(
        logits, one["decoder_target_tokens"], losses.loss_weights(one))[0]


@pytest.mark.parametrize("mode,lengths,deep", [
    ("concat", (2, 5, 0), None), ("add", (3, 3, 3), None),
    # Per-task prompts of different lengths under a P-tuning v2 deep prompt: the shorter
    # ones are left-padded, and the deep prompt's keys must not see the padding.
    ("concat", (2, 5, 0), DeepPromptSpec("p_tuning_v2", 2))])
def test_mixed_task_batch_equals_each_task_alone(mode, lengths, deep):
    model = make_model(mode, 3, lengths, deep=deep)
    params = init(model, seed=1)
    rng = np.random.default_rng(0)
    b = batch(rng, [1, 0, 2, 2, 0, 1])
    logits = model.apply({"params": params}, b["encoder_input_tokens"],
                         b["decoder_input_tokens"], b["decoder_target_tokens"],
                         task_index=b["task_index"])
    ll = losses.per_example_log_likelihood(logits, b["decoder_target_tokens"],
                                           losses.loss_weights(b))
    want = by_hand(params, mode)  # the combined prompts computed independently
    for row, task in enumerate(b["task_index"]):
        alone_logits, alone_ll = alone_log_likelihood(params, want[NAMES[task]], b, row, deep)
        np.testing.assert_allclose(logits[row], alone_logits, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ll[row], alone_ll, atol=1e-5, rtol=1e-6)
    # Control: with another task's prompt the row differs, so the check can fail.
    other, _ = alone_log_likelihood(params, want[NAMES[(b["task_index"][0] + 1) % 3]], b, 0,
                                    deep)
    assert np.abs(logits[0] - other).max() > 1e-3


def _weight_gradient_dots(hlo: str, shape: tuple[int, int]) -> int:
    """Count dot instructions whose result has a weight's shape (a weight gradient)."""
    pattern = re.compile(rf"= f32\[{shape[0]},{shape[1]}\]\{{[^}}]*\}} dot\(")
    return len(pattern.findall(hlo))


def test_compiled_step_computes_no_weight_gradients():
    model = make_model()
    params = init(model)
    b = batch(np.random.default_rng(0), [0, 1, 2])
    tx = optim.adafactor()
    hlo = {}
    for name, regexes in (("prompt", optim.DEFAULT_TRAINABLE), ("model", optim.MODEL_TUNING)):
        trainable, frozen = optim.split_params(params, regexes)
        state = train_step.TrainState.create(trainable, tx)
        step = jax.jit(train_step.make_train_step(model, tx))
        hlo[name] = step.lower(state, frozen, b).compile().as_text()
    for shape in ((CONFIG.d_model, CONFIG.d_ff), (CONFIG.d_ff, CONFIG.d_model)):
        assert _weight_gradient_dots(hlo["model"], shape) > 0  # the check can see them ...
        assert _weight_gradient_dots(hlo["prompt"], shape) == 0  # ... and they are absent


def test_gradients_reach_the_shared_prompt_and_the_batch_tasks_only():
    model = make_model()
    params = init(model)
    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    b = batch(np.random.default_rng(0), [1, 1, 2])  # no row of task_a

    def loss(t):
        return train_step.compute_loss(model, optim.merge_params(t, frozen), b,
                                       train_step.LossConfig(), None)[0]

    grads = optim.flatten(jax.grad(loss)(trainable))
    norms = {k: float(jnp.abs(v).max()) for k, v in grads.items()}
    assert norms["multitask_prompt/task_a/prompt"] == 0.0, norms
    assert norms["multitask_prompt/task_b/prompt"] > 0.0, norms
    assert norms["multitask_prompt/shared/prompt"] > 0.0, norms


def test_microbatches_carry_each_rows_task():
    model = make_model()
    trainable, frozen = optim.split_params(init(model), optim.DEFAULT_TRAINABLE)
    b = batch(np.random.default_rng(4), [0, 1, 2, 1])
    tx = optim.adafactor()
    out = {}
    for k in (1, 2):
        step = jax.jit(train_step.make_train_step(model, tx, num_microbatches=k))
        state, metrics = step(train_step.TrainState.create(trainable, tx), frozen, b)
        out[k] = (optim.flatten(state.trainable), float(metrics["grad_norm"]))
    np.testing.assert_allclose(out[2][1], out[1][1], rtol=1e-5)
    for path, value in out[1][0].items():
        np.testing.assert_allclose(out[2][0][path], value, atol=1e-6, err_msg=path)


def test_saved_task_prompts_reproduce_the_logits(tmp_path):
    model = make_model()
    params = init(model, seed=2)
    b = batch(np.random.default_rng(3), [0, 1, 2])
    multitask.save_task_prompts(params, model, lambda t: str(tmp_path / t / "best_prompt.npy"))
    combined = multitask.combined_prompts(params, model)
    mixed = model.apply({"params": params}, b["encoder_input_tokens"],
                        b["decoder_input_tokens"], b["decoder_target_tokens"],
                        task_index=b["task_index"])
    for row, name in enumerate(NAMES):
        loaded = prompts.load_prompt(str(tmp_path / name / "best_prompt.npy"))
        np.testing.assert_array_equal(loaded, np.asarray(combined[name]))
        from_file, _ = alone_log_likelihood(params, loaded, b, row)
        in_memory, _ = alone_log_likelihood(params, combined[name], b, row)
        np.testing.assert_array_equal(from_file, in_memory)
        np.testing.assert_allclose(from_file, mixed[row], atol=1e-5, rtol=0)


def test_bad_specs_are_one_line_errors():
    with pytest.raises(ValueError, match=r"mode='mul' is not one of add, concat"):
        MultitaskPrompts(mode="mul")
    with pytest.raises(ValueError, match=r"task_lengths\['task_a'\] must be a non-negative"):
        MultitaskPrompts(task_lengths={"task_a": -1})
    spec = MultitaskPrompts(shared_length=4, mode="add", task_lengths={"task_b": 2})
    with pytest.raises(ValueError, match=r"mode='add' needs every task prompt as long as the "
                                         r"shared prompt \(4\); task_b has 2"):
        spec.lengths(NAMES)
    with pytest.raises(ValueError, match=r"names 'task_z', which is not a task of the mixture"):
        MultitaskPrompts(task_lengths={"task_z": 2}).lengths(NAMES)
    with pytest.raises(ValueError, match=r"task_a has no prompt"):
        MultitaskPrompts(shared_length=0, task_length=0).lengths(NAMES)
    with pytest.raises(ValueError, match=r"'super_glue_rte' is a task; multi-task prompts "
                                         r"train on a seqio mixture"):
        multitask.mixture_tasks("super_glue_rte")
    assert MultitaskPrompts(shared_length=4, task_lengths={"task_b": 1}).lengths(NAMES) == (
        4, 1, 4)


# ------------------------------------------------------------- a real 2-task mixture

MIXTURE = "test_multitask_rte_sst2"  # the two tasks the package's demo data holds


@pytest.fixture
def mixture():
    import seqio

    from prompt_jax import tasks
    from prompt_jax.build import demo_path

    if MIXTURE in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(MIXTURE)
    seqio.MixtureRegistry.add(MIXTURE, [("super_glue_rte", 2.0), ("glue_sst2", 1.0)])
    import gin

    with gin.unlock_config():
        gin.bind_parameter("prompt_jax.tasks.data_paths.data_dir", demo_path(""))
    yield MIXTURE
    seqio.MixtureRegistry.remove(MIXTURE)
    del tasks


def test_mixture_rows_are_each_tasks_own_rows_with_their_index(mixture):
    from prompt_jax import data

    names = multitask.mixture_tasks(mixture)
    assert names == ("glue_sst2", "super_glue_rte")  # sorted: the task index order
    lengths = {"inputs": 64, "targets": 8}
    mixed = list(multitask.get_dataset(mixture, "validation", lengths, task_names=names,
                                       shuffle=False, seed=3, num_epochs=1)
                 .take(40).as_numpy_iterator())
    alone = [list(data.get_dataset(n, "validation", lengths, shuffle=False, seed=3,
                                   num_epochs=1).take(40).as_numpy_iterator()) for n in names]
    seen = [0, 0]
    for row in mixed:
        i = int(row[multitask.TASK_INDEX])
        want = alone[i][seen[i]]
        seen[i] += 1
        assert set(row) == set(want) | {multitask.TASK_INDEX}
        for key in want:
            np.testing.assert_array_equal(row[key], want[key], err_msg=key)
    assert min(seen) > 0, seen  # both tasks in the first 40 rows


def test_train_on_a_two_task_mixture_writes_per_task_prompts(mixture, tmp_path, capsys):
    from conftest import run, train_args

    model_dir = tmp_path / "run"
    rc, out, err = run(capsys, *train_args(model_dir, steps=3, period=3, settings=(
        "--gin_file=demo.gin", "--gin_file=methods/multitask.gin",
        f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'", "--gin.BATCH_SIZE=4",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
        "--gin.train.eval_examples=4", "--gin.MultitaskPrompts.shared_length=3",
        "--gin.MultitaskPrompts.task_length=5",
        "--gin.MultitaskPrompts.task_lengths={'glue_sst2': 2}")))
    assert rc == 0, err
    d_model = 64  # the demo's in-house tiny T5
    for task, length in (("glue_sst2", 3 + 2), ("super_glue_rte", 3 + 5)):
        for name in ("3.npy", "best_prompt.npy"):
            prompt = prompts.load_prompt(str(model_dir / "task_prompts" / task / name))
            assert prompt.shape == (length, d_model), (task, name)
    assert not (model_dir / "best_prompt.npy").exists()
    evals = [r for r in _metrics(model_dir) if r.get("split")]
    assert {"glue_sst2/loss", "super_glue_rte/loss", "mean/loss"} <= set(evals[-1]), evals[-1]
    np.testing.assert_allclose(evals[-1]["mean/loss"], (evals[-1]["glue_sst2/loss"]
                               + evals[-1]["super_glue_rte/loss"]) / 2, rtol=1e-6)
    # `prompt-jax eval` of one task of the run takes that task's saved prompt and measures
    # what the run's eval measured.
    rte = model_dir / "task_prompts" / "super_glue_rte" / "best_prompt.npy"
    rc, out, err = run(capsys, "eval", "--gin_file=demo_eval.gin",
                       f"--gin.MODEL_DIR='{model_dir}'",
                       "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
                       "--gin.evaluate.eval_examples=4")
    assert rc == 0, err
    import json

    measured = json.loads((model_dir / "eval_validation.json").read_text())["metrics"]
    assert json.loads((model_dir / "eval_validation.json").read_text())["prompt_file"] == str(
        rte)
    np.testing.assert_allclose(measured["loss"], evals[-1]["super_glue_rte/loss"], rtol=1e-5)
    # `prompt-jax infer` on the mixture: each example with its task's saved prompt.
    rc, out, err = run(capsys, "infer", "--gin_file=demo_infer.gin",
                       f"--gin.MODEL_DIR='{model_dir}'", f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'",
                       "--gin.infer.max_examples=4")
    assert rc == 0, err
    assert len((model_dir / "predictions.jsonl").read_text().splitlines()) == 4


def _metrics(model_dir):
    from prompt_jax import model_dir as model_dir_lib

    return model_dir_lib.read_metrics(str(model_dir))


def test_eval_of_a_whole_multitask_run_asks_for_one_task(mixture, tmp_path, capsys):
    from conftest import assert_one_line_error, run

    for task in ("glue_sst2", "super_glue_rte"):
        prompts.save_prompt(str(tmp_path / "task_prompts" / task / "best_prompt.npy"),
                            np.zeros((2, 64), np.float32))
    assert multitask.default_prompt_files(str(tmp_path), "glue_sst2") == {
        "glue_sst2": str(tmp_path / "task_prompts" / "glue_sst2" / "best_prompt.npy")}
    assert multitask.default_prompt_files(str(tmp_path / "other"), mixture) == {}
    rc, _, err = run(capsys, "eval", "--gin_file=demo_eval.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                     f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'")
    assert_one_line_error(rc, err, r"holds one prompt per task \(glue_sst2, super_glue_rte\); "
                                   r"evaluate one task")


def test_a_resumed_multitask_run_equals_an_uninterrupted_one(mixture, tmp_path, capsys):
    """2 steps, then the same run continued to 4 (a new process would do the same: the
    state, the mixture's batches and dropout come from the checkpoint's step) = 4 steps in
    one go: the same per-task prompts at step 4."""
    from conftest import run, train_args

    settings = ("--gin_file=demo.gin", "--gin_file=methods/multitask.gin",
                f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'", "--gin.BATCH_SIZE=4",
                "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
                "--gin.train.eval_split=None", "--gin.MultitaskPrompts.shared_length=3",
                "--gin.MultitaskPrompts.task_length=2")
    import gin

    rc, _, err = run(capsys, *train_args(tmp_path / "whole", steps=4, period=2,
                                         settings=settings))
    assert rc == 0, err
    for steps in (2, 4):
        gin.clear_config()
        rc, out, err = run(capsys, *train_args(tmp_path / "resumed", steps=steps, period=2,
                                               settings=settings))
        assert rc == 0, err
    assert "resuming" in out and "from step 2" in out
    for task in ("glue_sst2", "super_glue_rte"):
        whole = prompts.load_prompt(str(tmp_path / "whole" / "task_prompts" / task / "4.npy"))
        resumed = prompts.load_prompt(str(tmp_path / "resumed" / "task_prompts" / task /
                                          "4.npy"))
        np.testing.assert_allclose(resumed, whole, atol=1e-6, err_msg=task)
        two = prompts.load_prompt(str(tmp_path / "whole" / "task_prompts" / task / "2.npy"))
        assert np.abs(two - whole).max() > 1e-5  # the steps after the resume moved it


def test_mixture_early_stopping_on_plain_loss_fails_before_the_first_step(mixture, tmp_path,
                                                                          capsys):
    """A mixture reports `<task>/loss` each; `early_stopping_metric='loss'` (pretrain.gin's)
    used to fail only at the first eval, after EVAL_PERIOD steps of training."""
    from conftest import assert_one_line_error, run, train_args

    model_dir = tmp_path / "run"
    rc, out, err = run(capsys, *train_args(model_dir, steps=3, period=3, settings=(
        "--gin_file=demo.gin", f"--gin.MIXTURE_OR_TASK_NAME='{mixture}'",
        "--gin.BATCH_SIZE=4", "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}",
        "--gin.train.eval_examples=4", "--gin.PromptInit.kind='sampled_vocab'",
        "--gin.train.early_stopping_metric='loss'")))
    assert_one_line_error(rc, err, r"early_stopping_metric 'loss' is not a loss this "
                          r"evaluation reports; it reports \['glue_sst2/loss', "
                          r"'super_glue_rte/loss'\]")
    assert not (model_dir / "checkpoints").exists() or not any((model_dir / "checkpoints")
                                                                 .iterdir())
    assert "step 1" not in out + err
