"""Train and eval steps: pure functions of (state, frozen params, batch).

The trainable subset (the prompt, by default) is the only thing differentiated;
the frozen tree is a separate argument closed over by the loss, so XLA computes
no weight gradients for it, and the optimizer state holds nothing for it. Model
tuning (the paper's baseline) is the same step with every parameter trainable.

Batches are dicts of seqio's model features: `encoder_input_tokens` [B, T],
`decoder_input_tokens` [B, L], `decoder_target_tokens` [B, L] and optionally
`decoder_loss_weights` [B, L] (default: targets > 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from prompt_jax import losses
from prompt_jax.optim import merge_params
from prompt_jax.t5.model import T5

Array = jax.Array
Batch = dict[str, Array]


@flax.struct.dataclass
class TrainState:
    """What changes during training: the step, the trainable params and their optimizer state."""

    step: Array
    trainable: Any
    opt_state: Any

    @classmethod
    def create(cls, trainable: Any, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), trainable=trainable,
                   opt_state=tx.init(trainable))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """t5x's loss options (the prompt-tuning reference uses z_loss=1e-4, no smoothing,
    and sums over target tokens: `loss_normalizing_factor=None`)."""

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    loss_normalizing_factor: float | None = None


def loss_weights(batch: Batch) -> Array:
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def compute_loss(model: T5, params: Any, batch: Batch, loss_config: LossConfig,
                 dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """Teacher-forced loss of `batch` under `params` (dropout on iff `dropout_rng`)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=dropout_rng is not None, rngs=rngs)
    weights = loss_weights(batch)
    loss, aux = losses.cross_entropy_with_logits(
        logits, batch["decoder_target_tokens"], weights, z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        loss_normalizing_factor=loss_config.loss_normalizing_factor)
    # The loss is a sum over tokens (t5x); report the per-token cross-entropy beside it.
    normalizer = loss_config.loss_normalizing_factor or 1.0
    per_token = (loss - aux["z_loss"]) * normalizer / jnp.maximum(aux["num_tokens"], 1.0)
    metrics = {"loss": loss, "z_loss": aux["z_loss"], "num_tokens": aux["num_tokens"],
               "token_accuracy": aux["accuracy"], "cross_entropy_per_token": per_token}
    return loss, metrics


def make_train_step(model: T5, tx: optax.GradientTransformation,
                    loss_config: LossConfig = LossConfig(), dropout_seed: int = 0
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, Array]]]:
    """`train_step(state, frozen, batch) -> (state, metrics)`, not yet jitted.

    Dropout randomness is `fold_in(PRNGKey(dropout_seed), step)`, so a resumed run
    draws the same masks as an uninterrupted one.
    """
    base_rng = jax.random.PRNGKey(dropout_seed)

    def train_step(state: TrainState, frozen: Any, batch: Batch):
        rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(trainable):
            return compute_loss(model, merge_params(trainable, frozen), batch, loss_config, rng)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return train_step


def make_eval_step(model: T5, loss_config: LossConfig = LossConfig()
                   ) -> Callable[[Any, Any, Batch], dict[str, Array]]:
    """`eval_step(trainable, frozen, batch) -> metrics` (no dropout)."""

    def eval_step(trainable: Any, frozen: Any, batch: Batch):
        _, metrics = compute_loss(model, merge_params(trainable, frozen), batch, loss_config,
                                  None)
        return metrics

    return eval_step
