"""Gradient accumulation in the train step: k microbatches give the full batch's update."""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest
from conftest import tiny_config

from prompt_jax import optim, train_step
from prompt_jax.t5 import T5

P, B, T, L = 4, 8, 10, 5
STEPS = 4
# Float32 only reorders sums: each gradient element is a sum over the B·L target tokens,
# added per microbatch and then over microbatches instead of at once, so it differs by a
# few ulps of Σ|terms| — relatively more where the terms cancel (|sum| << Σ|terms|).
# Adafactor's update is g / sqrt(v), scale-free, times lr = 0.3, so an element's relative
# error of r moves the prompt by ~0.3·r per step. Measured with 4 data seeds, k = 2 and 4:
# max |Δprompt| 1.3e-6 .. 5.5e-6 after 4 steps (1 ulp after the first), while the prompt
# moves by ~1. The tolerance is 4x the worst seen; the metrics are sums of at most 40
# terms (relative error <= 40·2^-24 = 2.4e-6), measured equal to 2e-7.
PROMPT_ATOL = 2e-5
METRIC_RTOL = 1e-5


def batches(seed: int, n: int = STEPS):
    """Random batches whose targets have different lengths (so the microbatches hold
    different numbers of target tokens, which per-token metrics must weigh)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        enc = rng.integers(2, 128, (B, T)).astype(np.int32)
        enc[:, rng.integers(3, T):] = 0
        tgt = rng.integers(2, 128, (B, L)).astype(np.int32)
        lengths = rng.integers(1, L + 1, (B,))
        tgt[np.arange(L)[None, :] >= lengths[:, None]] = 0
        dec = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1)
        out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                    "decoder_target_tokens": tgt})
    return out


def run(k: int, config=None, data=None):
    """(final prompt, per-step metrics) of STEPS steps with k microbatches."""
    config = config or tiny_config()
    model = T5(config, prompt_length=P)
    b = batches(0, 1)[0]
    params = flax.linen.unbox(model.init(jax.random.PRNGKey(0), b["encoder_input_tokens"],
                                         b["decoder_input_tokens"])["params"])
    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    tx = optim.adafactor()
    state = train_step.TrainState.create(trainable, tx)
    step = jax.jit(train_step.make_train_step(model, tx, num_microbatches=k))
    history = []
    for batch in data or batches(1):
        state, metrics = step(state, frozen, batch)
        history.append(jax.device_get(metrics))
    return np.asarray(state.trainable["encoder"]["prompt"]["prompt"]), history


@pytest.fixture(scope="module")
def full_and_micro():
    return run(1), run(4)


def test_same_prompt_as_one_full_batch(full_and_micro):
    (full, _), (micro, _) = full_and_micro
    np.testing.assert_allclose(micro, full, atol=PROMPT_ATOL, rtol=0)
    # Control: the steps move the prompt far more than the tolerance.
    assert np.abs(full - run(1, data=batches(1, 1))[0]).max() > 1e3 * PROMPT_ATOL


def test_same_metrics_as_one_full_batch(full_and_micro):
    (_, full), (_, micro) = full_and_micro
    for step, (f, m) in enumerate(zip(full, micro, strict=True)):
        assert set(f) == set(m)
        for name in f:
            np.testing.assert_allclose(m[name], f[name], rtol=METRIC_RTOL, atol=1e-7,
                                       err_msg=f"step {step} {name}")


def test_per_token_loss_weighs_microbatches_by_tokens():
    # Control for the metric test: the mean of the microbatches' own per-token losses is
    # not the batch's (their token counts differ), so an unweighted average would fail it.
    config = tiny_config()
    model = T5(config, prompt_length=P)
    batch = batches(1, 1)[0]
    params = flax.linen.unbox(model.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                                         batch["decoder_input_tokens"])["params"])
    loss_config = train_step.LossConfig()
    _, whole = train_step.compute_loss(model, params, batch, loss_config, None)
    parts = [train_step.compute_loss(model, params, {k: v[i::4] for k, v in batch.items()},
                                     loss_config, None)[1] for i in range(4)]
    assert len({float(p["num_tokens"]) for p in parts}) > 1
    naive = np.mean([float(p["loss"]) for p in parts])
    assert abs(naive - float(whole["loss"])) > 100 * METRIC_RTOL * float(whole["loss"])


def test_dropout_differs_per_microbatch_and_is_reproducible():
    config = tiny_config(dropout_rate=0.3)
    first, again = run(4, config)[0], run(4, config)[0]
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - run(1, config)[0]).max() > 1e-4


def test_microbatches_must_divide_the_batch():
    with pytest.raises(ValueError, match="batch of 8 rows does not split into "
                                         "num_microbatches=3"):
        run(3)
    with pytest.raises(ValueError, match="positive integer"):
        train_step.make_train_step(T5(tiny_config()), optim.adafactor(), num_microbatches=0)
    # The job's check, per data shard: 32 rows on 4 shards are 8 per shard.
    train_step.check_num_microbatches(32, 4, 8)
    with pytest.raises(ValueError, match=r"BATCH_SIZE=32 gives 8 examples per data shard "
                                         r"\(of 4\), not divisible by "
                                         r"train.num_microbatches=16"):
        train_step.check_num_microbatches(32, 4, 16)
