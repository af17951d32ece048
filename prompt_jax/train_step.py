"""The train step, a pure function of (state, frozen params, batch), and the sharded state
it runs on.

The trainable subset (the prompt, by default) is the only thing differentiated;
the frozen tree is a separate argument closed over by the loss, so XLA computes
no weight gradients for it, and the optimizer state holds nothing for it. Model
tuning (the paper's baseline) is the same step with every parameter trainable.

Batches are dicts of seqio's model features: `encoder_input_tokens` [B, T],
`decoder_input_tokens` [B, L], `decoder_target_tokens` [B, L] and optionally
`decoder_loss_weights` [B, L] (default: targets > 0).

    state, frozen, shardings = initial_state(mesh, model, host_params, TRAINABLE, tx)
    step = jit_train_step(make_train_step(model, tx), mesh, shardings)
    state, metrics = step(state, frozen, partitioning.global_batch(local_batch, mesh))

With `num_microbatches=k` the step splits the batch into k microbatches of B/k rows
(row j goes to microbatch j mod k, so each holds B/(k·data) rows on every data shard),
runs forward and backward on each in turn (`jax.lax.scan`: activations of one microbatch
at a time), sums their gradients and applies one optimizer update. The objective is a sum
over tokens, so the summed gradient is the full batch's, up to float32 summation order.

Metrics of a step: `loss` (cross-entropy per target token, the meaning `loss` has on
eval lines too), `objective` (what is differentiated: t5x's summed loss, z-loss
included), `z_loss`, `num_tokens`, `token_accuracy`, `grad_norm`; with PET's loss on
(`LossConfig.pet_weight`), `pet_loss` (its cross-entropy per labelled row) and `pet_rows`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import losses, optim, partitioning
from prompt_jax.methods import verbalizers
from prompt_jax.optim import merge_params
from prompt_jax.pytree import flatten
from prompt_jax.t5.layers import constrain
from prompt_jax.t5.model import T5, abstract_params

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
    # PET (methods/verbalizers.py): add pet_weight x the verbalizer cross-entropy summed over
    # the batch's labelled rows; needs a bound verbalizer for the task. 0: off.
    pet_weight: float = 0.0


def head_loss(model: T5, params: Any, batch: Batch, label_tokens: np.ndarray,
              dropout_rng: Array | None) -> tuple[Array, dict[str, Array]]:
    """P-tuning v2's classification head (`T5.classify`): the cross-entropy of each
    labelled row's class (the label its target spells, `verbalizers.batch_labels`; other
    rows do not count), summed over the rows as t5x sums over tokens. Its metrics keep the
    train step's names: `loss` per labelled row, `num_tokens` the labelled rows,
    `token_accuracy` the head's accuracy on them, `z_loss` 0."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                         enable_dropout=dropout_rng is not None, rngs=rngs,
                         method=model.classify)
    labels = verbalizers.batch_labels(batch["decoder_target_tokens"], label_tokens)
    valid = labels >= 0
    rows = valid.sum().astype(jnp.float32)
    objective = verbalizers.pet_loss(logits, labels) * rows  # the same cross-entropy, summed
    correct = jnp.sum(valid & (jnp.argmax(logits, -1) == labels)).astype(jnp.float32)
    return objective, {"loss": objective / jnp.maximum(rows, 1.0), "objective": objective,
                       "z_loss": jnp.zeros((), jnp.float32), "num_tokens": rows,
                       "token_accuracy": correct / jnp.maximum(rows, 1.0)}


def compute_loss(model: T5, params: Any, batch: Batch, loss_config: LossConfig,
                 dropout_rng: Array | None, pet: verbalizers.PetTargets | None = None,
                 head_labels: np.ndarray | None = None) -> tuple[Array, dict[str, Array]]:
    """Teacher-forced loss of `batch` under `params` (dropout on iff `dropout_rng`); with
    `pet` and `loss_config.pet_weight`, PET's term beside it (`verbalizers.pet_sum`); with
    `head_labels` (the task's label targets [C, L]), the classification head's loss alone
    (`head_loss`)."""
    if head_labels is not None:
        return head_loss(model, params, batch, head_labels, dropout_rng)
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    # A multi-task batch carries each row's task (methods/multitask.py).
    task = {"task_index": batch["task_index"]} if "task_index" in batch else {}
    logits = model.apply({"params": params}, batch["encoder_input_tokens"],
                         batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                         enable_dropout=dropout_rng is not None, rngs=rngs, **task)
    objective, aux = losses.cross_entropy_with_logits(
        logits, batch["decoder_target_tokens"], losses.loss_weights(batch),
        z_loss=loss_config.z_loss, label_smoothing=loss_config.label_smoothing,
        loss_normalizing_factor=loss_config.loss_normalizing_factor)
    # The objective is a sum over tokens (t5x); `loss` is the cross-entropy per token.
    normalizer = loss_config.loss_normalizing_factor or 1.0
    per_token = (objective - aux["z_loss"]) * normalizer / jnp.maximum(aux["num_tokens"], 1.0)
    metrics = {"loss": per_token, "objective": objective, "z_loss": aux["z_loss"],
               "num_tokens": aux["num_tokens"], "token_accuracy": aux["accuracy"]}
    if pet is not None and loss_config.pet_weight:
        total, rows = verbalizers.pet_sum(model, params, batch, pet)
        objective = objective + loss_config.pet_weight * total
        metrics.update(objective=objective, pet_loss=total / jnp.maximum(rows, 1.0),
                       pet_rows=rows)
    return objective, metrics


def check_num_microbatches(batch_size: int, data_parallel: int, num_microbatches: int) -> None:
    """Each data shard's rows must split evenly into the microbatches."""
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"train.num_microbatches must be a positive integer, got "
                         f"{num_microbatches!r}")
    per_shard = batch_size // data_parallel
    if per_shard % num_microbatches:
        raise ValueError(f"BATCH_SIZE={batch_size} gives {per_shard} examples per data shard "
                         f"(of {data_parallel}), not divisible by train.num_microbatches="
                         f"{num_microbatches}")


def make_train_step(model: T5, tx: optax.GradientTransformation,
                    loss_config: LossConfig = LossConfig(), dropout_seed: int = 0,
                    num_microbatches: int = 1, pet: verbalizers.PetTargets | None = None,
                    head_labels: np.ndarray | None = None
                    ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, Array]]]:
    """`train_step(state, frozen, batch) -> (state, metrics)`, not yet jitted.

    Dropout randomness is `fold_in(PRNGKey(dropout_seed), step)` (microbatch i of k > 1:
    folded in again with i), so a resumed run draws the same masks as an uninterrupted one.
    `num_microbatches` must divide the batch (per data shard: `check_num_microbatches`).
    `pet`: the task's verbalizer, for `loss_config.pet_weight` (`compute_loss`).
    `head_labels`: the task's label targets [C, L] for a classification head (`head_loss`).
    """
    base_rng = jax.random.PRNGKey(dropout_seed)
    if not isinstance(num_microbatches, int) or num_microbatches < 1:
        raise ValueError(f"num_microbatches must be a positive integer, got {num_microbatches!r}")

    def train_step(state: TrainState, frozen: Any, batch: Batch):
        rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(trainable, batch, rng):
            return compute_loss(model, merge_params(trainable, frozen), batch, loss_config, rng,
                                pet, head_labels)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if num_microbatches == 1:
            (_, metrics), grads = grad_fn(state.trainable, batch, rng)
        else:
            grads, metrics = _accumulate(grad_fn, state.trainable, batch, rng,
                                         num_microbatches, loss_config,
                                         pet if loss_config.pet_weight else None)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return train_step


def _accumulate(grad_fn: Callable, trainable: Any, batch: Batch, rng: Array, k: int,
                loss_config: LossConfig, pet: Any = None) -> tuple[Any, dict[str, Array]]:
    """(Σ of the k microbatches' gradients, the whole batch's metrics)."""
    size = batch["encoder_input_tokens"].shape[0]
    if size % k:
        raise ValueError(f"a batch of {size} rows does not split into num_microbatches={k}")

    def split(x):  # [B, ...] -> [k, B/k, ...]; microbatch i holds rows i, i + k, ...
        x = jnp.swapaxes(x.reshape((size // k, k) + x.shape[1:]), 0, 1)
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    def body(carry, xs):
        grads, sums = carry
        micro, i = xs
        (_, m), g = grad_fn(trainable, micro, jax.random.fold_in(rng, i))
        m["token_correct"] = m.pop("token_accuracy") * m["num_tokens"]
        if "pet_loss" in m:  # PET's sum over labelled rows, then its mean over the batch
            m["pet_total"] = m.pop("pet_loss") * m["pet_rows"]
        del m["loss"]
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, m)), None

    zeros = jnp.zeros((), jnp.float32)
    sums = dict(objective=zeros, z_loss=zeros, num_tokens=zeros, token_correct=zeros)
    if pet is not None:
        sums.update(pet_total=zeros, pet_rows=zeros)
    carry = (jax.tree.map(jnp.zeros_like, trainable), sums)
    (grads, sums), _ = jax.lax.scan(body, carry, (jax.tree.map(split, batch), jnp.arange(k)))
    # Per-token metrics of the whole batch, as `compute_loss` computes them for one.
    n = sums["num_tokens"]
    normalizer = loss_config.loss_normalizing_factor or 1.0
    metrics = {"loss": (sums["objective"] - sums["z_loss"]) * normalizer / jnp.maximum(n, 1.0),
               "objective": sums["objective"], "z_loss": sums["z_loss"], "num_tokens": n,
               "token_accuracy": jnp.where(n > 0, sums["token_correct"] / jnp.maximum(n, 1e-30),
                                           0.0)}
    if pet is not None:
        metrics.update(pet_loss=sums["pet_total"] / jnp.maximum(sums["pet_rows"], 1.0),
                       pet_rows=sums["pet_rows"])
    return grads, metrics


@dataclasses.dataclass(frozen=True)
class Shardings:
    """Where everything of a run lives on the mesh (trees of NamedShardings)."""

    params: Any  # the whole parameter tree (trainable + frozen)
    trainable: Any
    frozen: Any
    state: TrainState


def initial_state(mesh: jax.sharding.Mesh, model: T5, host_params: Any,
                  trainable: Sequence[str], tx: optax.GradientTransformation
                  ) -> tuple[TrainState, Any, Shardings]:
    """The train state and the frozen tree of `model`, placed on `mesh` from host params.

    `host_params` is the whole tree (numpy arrays, the prompt included) as the model names
    it; `trainable` regexes select what is trained (`optim.split_params`). Each device
    receives only its shards; the optimizer state is created on the devices, sharded like
    its parameters. -> (state, frozen, shardings).
    """
    from prompt_jax.checkpoints.tree import check_params

    check_params(host_params, model.config, "initial_state", model.prompt_length, model=model)
    params_sh = partitioning.params_shardings(
        mesh, abstract_params(model.config, model.prompt_length, boxed=True, model=model))
    trainable_host, frozen_host = optim.split_params(host_params, trainable)
    trainable_sh, frozen_sh = optim.split_params(params_sh, trainable)
    if not flatten(frozen_host):
        frozen_host = frozen_sh = {}
    state_sh = TrainState(
        step=partitioning.to_shardings(mesh, partitioning.P()), trainable=trainable_sh,
        opt_state=partitioning.opt_state_shardings(
            tx, jax.eval_shape(lambda: trainable_host), trainable_sh))
    create = partitioning.sharded_jit(lambda t: TrainState.create(t, tx), mesh,
                                      in_shardings=(trainable_sh,), out_shardings=state_sh)
    state = create(partitioning.shard_params(trainable_host, trainable_sh))
    frozen = partitioning.shard_params(frozen_host, frozen_sh)
    return state, frozen, Shardings(params_sh, trainable_sh, frozen_sh, state_sh)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh, shardings: Shardings
                   ) -> Callable[[TrainState, Any, Batch], tuple[TrainState, dict[str, Array]]]:
    """`train_step` compiled for the mesh: batch rows on `data`, the state donated."""
    return partitioning.sharded_jit(
        train_step, mesh,
        in_shardings=(shardings.state, shardings.frozen, partitioning.batch_sharding(mesh)),
        out_shardings=(shardings.state, None), donate_argnums=(0,))
