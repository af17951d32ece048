"""Cross-entropy, z-loss, label smoothing and sequence log-likelihoods against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import losses

V = 5
TARGETS = np.array([[3, 1, 0], [4, 2, 2]])  # 0 is padding
WEIGHTS = (TARGETS > 0).astype(np.float32)


def make_logits(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 3, V)).astype(np.float32) * 2


def np_log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    log_z = m + np.log(np.exp(x - m).sum(-1, keepdims=True))
    return x - log_z, log_z[..., 0]


def np_loss(logits, targets, weights, z_loss=0.0, ls=0.0):
    """Dense t5x formula: -Σ_v q_v log p_v - H(q) + z_loss log(Z)², weighted and summed."""
    logp, log_z = np_log_softmax(logits)
    q = np.full(logits.shape, ls / (V - 1))
    np.put_along_axis(q, targets[..., None], 1.0 - ls, axis=-1)
    entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), axis=-1)
    tok = -np.sum(q * logp, axis=-1) - entropy + z_loss * log_z**2
    return np.sum(tok * weights), np.sum(z_loss * log_z**2 * weights)


def ce(logits, **kw):
    return losses.cross_entropy_with_logits(
        jnp.asarray(logits), jnp.asarray(TARGETS), jnp.asarray(WEIGHTS), **kw)


def test_uniform_logits_by_hand():
    # Zero logits: each of the 5 real tokens costs log 5, and log Z = log 5. Sum, not mean.
    loss, aux = ce(np.zeros((2, 3, V), np.float32), z_loss=1e-4)
    np.testing.assert_allclose(loss, 5 * np.log(5) + 5 * 1e-4 * np.log(5) ** 2, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], 5 * 1e-4 * np.log(5) ** 2, rtol=1e-6)
    assert aux["num_tokens"] == 5


def test_plain_cross_entropy_ignores_padding():
    logits = make_logits()
    loss, aux = ce(logits)
    logp, _ = np_log_softmax(logits)
    by_hand = -(logp[0, 0, 3] + logp[0, 1, 1] + logp[1, 0, 4] + logp[1, 1, 2] + logp[1, 2, 2])
    np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
    assert aux["z_loss"] == 0 and aux["num_tokens"] == 5
    # Changing a padded position's logits changes nothing.
    logits2 = logits.copy()
    logits2[0, 2] += 10.0
    np.testing.assert_allclose(ce(logits2)[0], loss, rtol=1e-7)
    correct = np.argmax(logits, -1) == TARGETS
    np.testing.assert_allclose(aux["accuracy"], np.sum(correct * WEIGHTS) / 5, rtol=1e-6)


@pytest.mark.parametrize("z_loss, ls", [(1e-4, 0.0), (0.1, 0.0), (0.0, 0.1), (0.05, 0.2)])
def test_against_dense_numpy(z_loss, ls):
    logits = make_logits(1)
    loss, aux = ce(logits, z_loss=z_loss, label_smoothing=ls)
    want, want_z = np_loss(logits, TARGETS, WEIGHTS, z_loss, ls)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["z_loss"], want_z, rtol=1e-5, atol=1e-12)


def test_loss_normalizing_factor_divides_loss_and_z_loss():
    logits = make_logits(2)
    loss, aux = ce(logits, z_loss=0.1)
    loss_n, aux_n = ce(logits, z_loss=0.1, loss_normalizing_factor=4.0)
    np.testing.assert_allclose(loss_n, loss / 4, rtol=1e-6)
    np.testing.assert_allclose(aux_n["z_loss"], aux["z_loss"] / 4, rtol=1e-6)
    assert aux_n["num_tokens"] == aux["num_tokens"]


def test_label_smoothing_perfect_prediction_is_zero():
    ls = 0.1
    q = np.full((2, 3, V), ls / (V - 1))
    np.put_along_axis(q, TARGETS[..., None], 1 - ls, axis=-1)
    loss, _ = ce(np.log(q).astype(np.float32), label_smoothing=ls)
    assert abs(float(loss)) < 1e-5
    # ...and anything else costs more.
    assert float(ce(make_logits(3), label_smoothing=ls)[0]) > 0.1


@pytest.mark.parametrize("ls,factor", [(0.0, None), (0.1, None), (0.1, 7.0)])
def test_gradient_with_z_loss(ls, factor):
    z = 0.1
    logits = make_logits(4)
    grad = jax.grad(lambda x: ce(x, z_loss=z, label_smoothing=ls,
                                 loss_normalizing_factor=factor)[0])(jnp.asarray(logits))
    # d/dlogits [CE(q) + z log(Z)²] = (1 + 2 z log Z) softmax - q, per weighted token.
    logp, log_z = np_log_softmax(logits)
    q = np.full(logits.shape, ls / (V - 1))
    np.put_along_axis(q, TARGETS[..., None], 1.0 - ls, axis=-1)
    want = ((1 + 2 * z * log_z[..., None]) * np.exp(logp) - q) * WEIGHTS[..., None] / (
        factor or 1.0)
    # The z-loss part alone (what `aux['z_loss']` reports): 2 z log Z softmax.
    grad_z = jax.grad(lambda x: ce(x, z_loss=z, label_smoothing=ls,
                                   loss_normalizing_factor=factor)[1]["z_loss"])(
        jnp.asarray(logits))
    np.testing.assert_allclose(grad_z, 2 * z * log_z[..., None] * np.exp(logp)
                               * WEIGHTS[..., None] / (factor or 1.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    # One coordinate by central finite difference, as a check on the formula itself.
    eps = 1e-2
    f = lambda x: float(np_loss(x, TARGETS, WEIGHTS, z, ls)[0]) / (factor or 1.0)
    bump = np.zeros_like(logits, dtype=np.float64)
    bump[1, 0, 3] = eps
    fd = (f(logits + bump) - f(logits - bump)) / (2 * eps)
    np.testing.assert_allclose(grad[1, 0, 3], fd, rtol=1e-3)


def test_bf16_logits_computed_in_float32():
    logits = jnp.asarray(make_logits(5) * 20, jnp.bfloat16)
    loss, aux = ce(logits, z_loss=1e-4)
    assert loss.dtype == jnp.float32 and aux["z_loss"].dtype == jnp.float32
    want, _ = np_loss(np.asarray(logits, np.float32), TARGETS, WEIGHTS, 1e-4)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[B, L, V\]"):
        losses.cross_entropy_with_logits(jnp.zeros((2, 4, V)), jnp.asarray(TARGETS),
                                         jnp.asarray(WEIGHTS))


def test_per_example_log_likelihood():
    logits = make_logits(6)
    got = losses.per_example_log_likelihood(
        jnp.asarray(logits, jnp.bfloat16), jnp.asarray(TARGETS), jnp.asarray(WEIGHTS))
    logp, _ = np_log_softmax(np.asarray(jnp.asarray(logits, jnp.bfloat16), np.float32))
    want = [logp[0, 0, 3] + logp[0, 1, 1], logp[1, 0, 4] + logp[1, 1, 2] + logp[1, 2, 2]]
    assert got.shape == (2,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Summed over examples it is minus the plain loss.
    np.testing.assert_allclose(-got.sum(), ce(np.asarray(jnp.asarray(logits, jnp.bfloat16),
                                                         np.float32))[0], rtol=1e-5)


def test_tied_output_projection_gradient_equals_autodiff():
    """`layers.attend` (its table gradient written out so XLA's CPU backend does not
    transpose the logits gradient) has the value and both gradients of jnp.dot(x, table.T)
    under autodiff, here through the loss of a [2, 3, V] batch."""
    from prompt_jax.t5.layers import attend

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(V, 4)), jnp.float32)

    def loss(f):
        return lambda x, t: ce(f(x, t), z_loss=0.1)[0]

    ours = jax.grad(loss(attend), argnums=(0, 1))(x, table)
    ref = jax.grad(loss(lambda x, t: jnp.einsum("ble,ve->blv", x, t)), argnums=(0, 1))(x, table)
    np.testing.assert_allclose(attend(x, table), jnp.einsum("ble,ve->blv", x, table),
                               rtol=1e-6)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert float(jnp.abs(b).max()) > 1e-2  # not trivially zero
