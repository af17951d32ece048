"""The prompt-only train step: frozen weights untouched, no weight gradients, learning."""

from __future__ import annotations

import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import decoding, optim, train_step
from prompt_jax.t5 import T5, get_config

P = 16
# d_ff differs from every other size and token count so that the MLP weight gradients'
# shapes are recognisable in HLO.
CONFIG = get_config("tiny", vocab_size=128, d_model=64, d_kv=16, num_heads=4, d_ff=80,
                    dropout_rate=0.0)


def fixed_label_batch(rng, n=16, length=12):
    """Random inputs; the target is always the label string [10, 11] + EOS."""
    enc = rng.integers(20, 128, (n, length)).astype(np.int32)
    enc[:, -1] = 1
    tgt = np.tile(np.array([[10, 11, 1]], np.int32), (n, 1))
    dec = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt}


def init_params(config, prompt_length=P, seed=0):
    model = T5(config, prompt_length=prompt_length)
    b = fixed_label_batch(np.random.default_rng(0), n=2)
    params = model.init(jax.random.PRNGKey(seed), b["encoder_input_tokens"],
                        b["decoder_input_tokens"])["params"]
    return model, flax.linen.unbox(params)


def test_prompt_is_prepended_and_masked():
    model, params = init_params(CONFIG)
    enc = jnp.array([[5, 6, 1, 0, 0]])
    encoded, mask = model.apply({"params": params}, enc, method=T5.encode)
    assert encoded.shape == (1, P + 5, CONFIG.d_model)
    np.testing.assert_array_equal(mask, [[True] * P + [True, True, True, False, False]])


def test_frozen_weights_bitwise_unchanged_and_prompt_trained():
    model, params = init_params(CONFIG)
    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    assert list(optim.flatten(trainable)) == ["encoder/prompt/prompt"]
    tx = optim.adafactor()
    state = train_step.TrainState.create(trainable, tx)
    frozen_before = jax.tree.map(np.array, frozen)
    prompt_before = np.array(trainable["encoder"]["prompt"]["prompt"])

    step = jax.jit(train_step.make_train_step(model, tx))
    rng = np.random.default_rng(1)
    for _ in range(5):
        state, _ = step(state, frozen, fixed_label_batch(rng))

    for path, value in optim.flatten(frozen).items():
        np.testing.assert_array_equal(np.asarray(value), optim.flatten(frozen_before)[path],
                                      err_msg=path)
    assert not np.allclose(state.trainable["encoder"]["prompt"]["prompt"], prompt_before)
    # The optimizer state holds leaves only for the trainable prompt.
    state_shapes = {tuple(x.shape) for x in jax.tree.leaves(state.opt_state)}
    param_shapes = {tuple(v.shape) for v in optim.flatten(frozen).values()}
    assert (P, CONFIG.d_model) in state_shapes
    assert not (state_shapes - {(), (P, CONFIG.d_model), (1,)}), state_shapes
    assert not (state_shapes & (param_shapes - {(CONFIG.d_model,)}))


def _weight_gradient_dots(hlo: str, shape: tuple[int, int]) -> int:
    """Count dot instructions whose result has a weight's shape (a weight gradient)."""
    pattern = re.compile(rf"= f32\[{shape[0]},{shape[1]}\]\{{[^}}]*\}} dot\(")
    return len(pattern.findall(hlo))


def test_compiled_prompt_step_computes_no_weight_gradients():
    model, params = init_params(CONFIG)
    batch = fixed_label_batch(np.random.default_rng(0), n=3, length=13)  # 3 x (16 + 13) tokens
    tx = optim.adafactor()
    hlo, flops = {}, {}
    for name, regexes in (("prompt", optim.DEFAULT_TRAINABLE), ("model", optim.MODEL_TUNING)):
        trainable, frozen = optim.split_params(params, regexes)
        state = train_step.TrainState.create(trainable, tx)
        step = jax.jit(train_step.make_train_step(model, tx))
        compiled = step.lower(state, frozen, batch).compile()
        hlo[name], flops[name] = compiled.as_text(), compiled.cost_analysis()["flops"]
    # Forward + input gradients only: about 2/3 of the model-tuning step's FLOPs.
    assert flops["prompt"] < 0.8 * flops["model"], flops
    # mlp/wi_0 kernels are [64, 80], mlp/wo [80, 64]: their gradients are dots of that shape.
    for shape in ((CONFIG.d_model, CONFIG.d_ff), (CONFIG.d_ff, CONFIG.d_model)):
        assert _weight_gradient_dots(hlo["model"], shape) > 0  # the check can see them ...
        assert _weight_gradient_dots(hlo["prompt"], shape) == 0  # ... and they are absent


def test_prompt_alone_learns_a_fixed_label_string():
    model, params = init_params(CONFIG)
    trainable, frozen = optim.split_params(params)
    tx = optim.adafactor()
    state = train_step.TrainState.create(trainable, tx)
    step = jax.jit(train_step.make_train_step(model, tx))
    rng = np.random.default_rng(2)
    losses = []
    for _ in range(150):
        state, metrics = step(state, frozen, fixed_label_batch(rng))
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:3])
    # Greedy decoding with the learned prompt now emits the label string.
    test = fixed_label_batch(np.random.default_rng(99), n=8)
    tuned = optim.merge_params(state.trainable, frozen)
    tokens, _ = decoding.greedy_decode(model, tuned, jnp.asarray(test["encoder_input_tokens"]), 3)
    np.testing.assert_array_equal(np.asarray(tokens), test["decoder_target_tokens"])


def test_model_tuning_changes_every_weight():
    model, params = init_params(CONFIG)
    trainable, frozen = optim.split_params(params, optim.MODEL_TUNING)
    assert not frozen
    tx = optim.adafactor()
    state = train_step.TrainState.create(trainable, tx)
    state, _ = jax.jit(train_step.make_train_step(model, tx))(
        state, frozen, fixed_label_batch(np.random.default_rng(0)))
    changed = {k: not np.array_equal(v, optim.flatten(params)[k])
               for k, v in optim.flatten(state.trainable).items()}
    assert all(changed.values()), [k for k, c in changed.items() if not c]


def test_bf16_frozen_weights_with_fp32_prompt_and_state():
    config = CONFIG.replace(param_dtype="bfloat16", dtype="bfloat16")
    model, params = init_params(config)
    trainable, frozen = optim.split_params(params)
    assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(frozen))
    assert trainable["encoder"]["prompt"]["prompt"].dtype == jnp.float32
    tx = optim.adafactor()
    state = train_step.TrainState.create(trainable, tx)
    step = jax.jit(train_step.make_train_step(model, tx))
    rng = np.random.default_rng(3)
    for _ in range(3):
        state, metrics = step(state, frozen, fixed_label_batch(rng))
    assert np.isfinite(float(metrics["loss"]))
    assert state.trainable["encoder"]["prompt"]["prompt"].dtype == jnp.float32
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))


@pytest.mark.parametrize("regexes", [(".*nothing.*",)])
def test_no_trainable_parameter_is_an_error(regexes):
    _, params = init_params(CONFIG)
    with pytest.raises(ValueError, match="nothing"):
        optim.split_params(params, regexes)
