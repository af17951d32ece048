"""`T5Config.remat_policy`: the same parameters, loss, gradients and decoding under each
policy (the memory it saves is measured in test_memory.py)."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from prompt_jax import decoding, train_step
from prompt_jax.pytree import flatten
from prompt_jax.t5 import T5
from prompt_jax.t5.config import REMAT_POLICIES
from prompt_jax.t5.model import abstract_params

P = 4


def batch(seed: int = 0, b: int = 4, t: int = 9, tl: int = 5):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, 128, (b, t)).astype(np.int32)
    enc[0, 6:] = 0
    tgt = rng.integers(2, 128, (b, tl)).astype(np.int32)
    tgt[1, 3:] = 0
    dec = np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt}


def params_for(config):
    b = batch()
    return flax.linen.unbox(T5(config, prompt_length=P).init(
        jax.random.PRNGKey(0), b["encoder_input_tokens"], b["decoder_input_tokens"])["params"])


def test_parameter_paths_do_not_depend_on_the_policy():
    paths = {p: {k: v.shape for k, v in flatten(abstract_params(
        tiny_config(remat_policy=p), P)).items()} for p in REMAT_POLICIES}
    assert paths["full"] == paths["none"] == paths["dots"]
    assert "encoder/layers_0/attention/query/kernel" in paths["full"]
    assert "decoder/layers_1/encoder_decoder_attention/out/kernel" in paths["dots"]


@pytest.mark.parametrize("dropout_rate", [0.0, 0.2])
def test_same_loss_and_gradients(dropout_rate):
    params = params_for(tiny_config())
    rng = jax.random.PRNGKey(3) if dropout_rate else None
    results = {}
    for policy in REMAT_POLICIES:
        model = T5(tiny_config(remat_policy=policy, dropout_rate=dropout_rate), prompt_length=P)
        loss = lambda p, m=model: train_step.compute_loss(m, p, batch(), train_step.LossConfig(),
                                                           rng)[0]
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    # Dropout: the same masks (another mask moves gradients by O(1)), but XLA fuses the
    # recomputed forward differently around the mask's scaling: float32 rounding, measured
    # at most 1.9e-6 on gradients of up to ~4. Without dropout, float32 summation order
    # only: at most 1.3e-6 (a query kernel's gradient, with the loss's written-out gradient,
    # `losses._weighted_sums`).
    atol = 1e-5 if dropout_rate else 2e-6
    (loss, grads) = results["none"]
    for policy in ("full", "dots"):
        other_loss, other_grads = results[policy]
        np.testing.assert_allclose(other_loss, loss, rtol=1e-6, err_msg=policy)
        for path, g in flatten(grads).items():  # every parameter: model tuning's gradients
            np.testing.assert_allclose(flatten(other_grads)[path], g, rtol=1e-6, atol=atol,
                                       err_msg=f"{policy} {path}")


def test_decoding_with_a_policy():
    params = params_for(tiny_config())
    enc = jnp.asarray(batch()["encoder_input_tokens"])
    out = {p: decoding.greedy_decode(T5(tiny_config(remat_policy=p), prompt_length=P), params,
                                     enc, 4)[0] for p in REMAT_POLICIES}
    np.testing.assert_array_equal(out["full"], out["none"])
    np.testing.assert_array_equal(out["dots"], out["none"])


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match=r"remat_policy must be one of \('none', 'full', "
                                         r"'dots'\), got 'dot'"):
        tiny_config(remat_policy="dot")
