"""Token cross-entropy as t5x computes it, and sequence log-likelihoods for rank classification.

Conventions (t5x `losses.compute_weighted_cross_entropy`, `EncoderDecoderModel.loss_fn`):
  - the loss is a SUM over tokens of weight · (cross-entropy + z_loss · log(Z)²), divided
    by `loss_normalizing_factor` only when one is given. The prompt-tuning configs set
    `LOSS_NORMALIZING_FACTOR = None`, so the reference loss is the un-normalized sum (t5x
    relies on Adafactor being nearly scale invariant; clipping by RMS makes it so).
  - padding is excluded through `weights` (T5: `weights = targets > 0`).
  - label smoothing puts 1 - ls on the target and ls / (V - 1) on every other token and
    subtracts that distribution's entropy, so a prediction equal to it costs 0.
Everything is computed in float32 whatever the dtype of the logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_logits(
    logits: Array,
    targets: Array,
    weights: Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    loss_normalizing_factor: float | Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Weighted, summed token cross-entropy with t5x's z-loss and label smoothing.

    Args:
      logits: [B, L, V] decoder logits (any float dtype).
      targets: [B, L] int target tokens.
      weights: [B, L] per-token loss weights (0 on padding).
      z_loss: coefficient of the auxiliary z_loss · log(Z)² term per token, Z = Σ exp(logits).
      label_smoothing: mass moved off the target, spread evenly over the other V - 1 tokens.
      loss_normalizing_factor: divide the summed loss (and z_loss) by this; None: no division.
    Returns:
      loss: scalar, Σ weights · (CE - smoothing entropy + z_loss · log(Z)²) / normalizer,
        the value t5x's `loss_fn` returns and differentiates (z-loss included).
      aux: `z_loss` (the z-loss part of `loss`, same weighting and normalization),
        `num_tokens` (Σ weights, t5x's `weight_sum`), `accuracy` (weighted fraction of
        tokens whose argmax is the target; 0 when Σ weights is 0).
    """
    if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits have shape {logits.shape}, targets {targets.shape}; "
                         "expected [B, L, V] and [B, L]")
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    normalizer = (jnp.asarray(1.0, jnp.float32) if loss_normalizing_factor is None
                  else jnp.asarray(loss_normalizing_factor, jnp.float32))
    total, total_z = _weighted_sums(logits, targets, weights, normalizer, float(z_loss),
                                    float(label_smoothing))
    num_tokens = jnp.sum(weights)
    correct = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights)
    accuracy = jnp.where(num_tokens > 0, correct / jnp.maximum(num_tokens, 1e-30), 0.0)
    return total, {"z_loss": total_z, "num_tokens": num_tokens, "accuracy": accuracy}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_sums(logits: Array, targets: Array, weights: Array, normalizer: Array,
                   z_loss: float, label_smoothing: float) -> tuple[Array, Array]:
    """(Σ weights · (CE - H(q) + z_loss · log(Z)²), Σ weights · z_loss · log(Z)²), each
    / normalizer: the loss and its z-loss part (float32 logits [B, L, V]).

    The gradient is written out (`_weighted_sums_bwd`): per token, (1 + 2 z log Z) p - q,
    with p = softmax(logits) and q the (smoothed) target distribution, in one elementwise
    pass; autodiff of `take_along_axis` would scatter into a zeroed [B, L, V] buffer
    first (an extra pass over the logits, ~8% of an in-house T5's pretraining step)."""
    return _weighted_sums_fwd(logits, targets, weights, normalizer, z_loss,
                              label_smoothing)[0]


def _weighted_sums_fwd(logits, targets, weights, normalizer, z_loss, label_smoothing):
    vocab_size = logits.shape[-1]
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target_log_prob = (jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
                       - log_z)
    if label_smoothing:
        confidence = 1.0 - label_smoothing
        low_confidence = label_smoothing / (vocab_size - 1)
        # -Σ_v q_v log p_v with q = low everywhere plus (confidence - low) on the target,
        # without building the [B, L, V] one-hot (Σ_v log p_v = Σ_v logits_v - V log Z).
        sum_log_probs = jnp.sum(logits, axis=-1) - vocab_size * log_z
        token_loss = (-(confidence - low_confidence) * target_log_prob
                      - low_confidence * sum_log_probs)
        # Entropy of q; t5x's 1e-20 guards log(0) when V - 1 tokens share nothing.
        entropy = -(confidence * jnp.log(confidence)
                    + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
        token_loss = token_loss - entropy
    else:
        token_loss = -target_log_prob
    token_z_loss = z_loss * jnp.square(log_z)
    total = jnp.sum((token_loss + token_z_loss) * weights) / normalizer
    total_z = jnp.sum(token_z_loss * weights) / normalizer
    return (total, total_z), (logits, targets, weights, normalizer, log_z)


def _weighted_sums_bwd(z_loss, label_smoothing, residuals, cotangents):
    logits, targets, weights, normalizer, log_z = residuals
    g_total, g_z = cotangents
    vocab_size = logits.shape[-1]
    p = jnp.exp(logits - log_z[..., None])
    z_term = (2.0 * z_loss) * log_z[..., None] * p  # d(z log(Z)²)/dlogits
    target = jnp.arange(vocab_size, dtype=targets.dtype) == targets[..., None]
    if label_smoothing:
        low = label_smoothing / (vocab_size - 1)
        q = jnp.where(target, 1.0 - label_smoothing, low)
    else:
        q = target.astype(jnp.float32)
    scale = (weights / normalizer)[..., None]
    d_logits = scale * (g_total * (p - q + z_term) + g_z * z_term)
    return d_logits, None, None, None


_weighted_sums.defvjp(_weighted_sums_fwd, _weighted_sums_bwd)


def loss_weights(batch: dict[str, Array]) -> Array:
    """[B, L] float32 weights of a batch's target tokens: `decoder_loss_weights` when the
    batch has them, else 1 on every non-padding target (T5: `targets > 0`)."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def per_example_log_likelihood(logits: Array, targets: Array, weights: Array) -> Array:
    """[B] Σ_l weights · log p(targets[b, l]) — t5x's `score_batch` (no z-loss, no smoothing).

    Args:
      logits: [B, L, V]; targets: [B, L] int; weights: [B, L] (0 on padding).
    """
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target_log_prob = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(target_log_prob * weights.astype(jnp.float32), axis=-1)
