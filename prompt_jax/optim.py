"""Adafactor with t5x's semantics, and the regex-selected trainable subset it updates.

The step differentiates only `trainable` (by default the prompt); the optimizer state is
`adafactor().init(trainable)`, so it holds nothing for frozen weights:

    trainable, frozen = split_params(params, DEFAULT_TRAINABLE)
    tx = adafactor()                       # the paper's settings
    opt_state = tx.init(trainable)
    grads = jax.grad(lambda t: loss(merge_params(t, frozen)))(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prompt_jax.pytree import flatten, unflatten

DEFAULT_TRAINABLE = (".*prompt.*",)
MODEL_TUNING = (".*",)


def adafactor(
    learning_rate: optax.ScalarOrSchedule = 0.3,
    *,
    decay_rate: float = 0.8,
    step_offset: int = 0,
    clipping_threshold: float | None = 1.0,
    weight_decay_rate: float | None = 1e-5,
    multiply_by_parameter_scale: bool = False,
    factored: bool = True,
    min_dim_size_to_factor: int = 128,
    epsilon1: float = 1e-30,
    epsilon2: float = 1e-3,
    beta1: float | None = None,
) -> optax.GradientTransformation:
    """Adafactor as `t5x.adafactor.Adafactor` computes it; defaults are the paper's settings.

    Per parameter, with t the 0-based update count and lr = learning_rate(t):
      β2_t = 1 - (t + 1 - step_offset) ** -decay_rate
      v    = β2_t·v + (1 - β2_t)·(g² + epsilon1)        (factored for big matrices, below)
      y    = g / sqrt(v)
      y   /= max(1, rms(y) / clipping_threshold)         rms over the whole array
      u    = lr · y · max(rms(param), epsilon2)          param factor only if
                                                         multiply_by_parameter_scale
      u    = beta1·m + (1 - beta1)·u  (m := u)           only if beta1 is not None
      new  = (1 - weight_decay_rate)·param - u           the decay is NOT scaled by lr

    Factoring (t5x's heuristic rule, identical in optax): an array of rank >= 2 keeps a
    row and a column statistic over its two largest dimensions when the second largest is
    >= min_dim_size_to_factor, so a [100, 768] prompt keeps a full `v` and a [150, 768] one
    is factored. Then v_row/v_col are the decayed means of g² + epsilon1 over the largest
    and the second-largest dimension and y = g / sqrt(outer(v_row / mean(v_row), v_col)).

    Built from optax's pieces (`scale_by_factored_rms`, `clip_by_block_rms`,
    `scale_by_learning_rate`, `scale_by_param_block_rms`, `ema`, `add_decayed_weights`,
    `scale(-1)`), whose semantics we checked against t5x: the same step counting and
    offset, epsilon1 added to g², block-RMS clipping before the learning rate, momentum on
    the scaled update with no debiasing, and weight decay added after the learning rate
    so that `param + update = (1 - wd)·param - lr·y`. Differences from `optax.adafactor`
    and t5x, and how they are resolved here:
      - optax keeps the statistics in the parameter's dtype; t5x keeps them in float32
        and computes in float32. We cast gradients and parameters to float32 on the way
        in, so the state is float32 and the returned updates are float32 (optax's
        `apply_updates` casts the sum back to the parameter's dtype, as t5x does).
      - `optax.adafactor` fixes the parameter-scale floor at 1e-3; we pass `epsilon2`.
      - t5x refuses rank > 2 arrays without an explicit factor rule; optax (and this
        function) factor them over their two largest dimensions. T5's parameters and
        the prompt are all rank <= 2, where the two agree.
      - t5x's `max_parameter_scale`, `global_norm_clip_threshold`, `skip_nan_updates`
        and logical factor rules are not offered.

    Step count: t5x's step is the train state's step, which a fine-tuning run restores
    from the pretrained checkpoint (the prompt-tuning configs keep `step_offset = 0` and
    count TRAIN_STEPS from the checkpoint's step, e.g. 1_100_000 for T5 1.1 lm100k), so
    the reference run starts with β2 ≈ 1 - 1.5e-5. Here t counts this optimizer's own
    updates from 0; pass `step_offset=-checkpoint_step` to reproduce the reference.

    Args:
      learning_rate: a float or an optax schedule of the update count.
    Returns:
      An optax transformation; its `update` needs `params`.
    """
    txs = [
        optax.scale_by_factored_rms(
            factored=factored,
            decay_rate=decay_rate,
            step_offset=step_offset,
            min_dim_size_to_factor=min_dim_size_to_factor,
            epsilon=epsilon1,
        )
    ]
    if clipping_threshold is not None:
        txs.append(optax.clip_by_block_rms(clipping_threshold))
    txs.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        txs.append(optax.scale_by_param_block_rms(min_scale=epsilon2))
    if beta1 is not None:
        txs.append(optax.ema(beta1, debias=False, accumulator_dtype=jnp.float32))
    if weight_decay_rate:
        txs.append(optax.add_decayed_weights(weight_decay_rate))
    txs.append(optax.scale(-1.0))
    return _in_float32(optax.chain(*txs))


def _in_float32(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `tx` on float32 copies of gradients and parameters (state and updates float32)."""
    to_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)

    def init(params):
        return tx.init(to_f32(params))

    def update(updates, state, params=None):
        return tx.update(to_f32(updates), state, None if params is None else to_f32(params))

    return optax.GradientTransformation(init, update)


def split_params(
    params: Any, regexes: Sequence[str] = DEFAULT_TRAINABLE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Partition the leaves into (trainable, frozen) nested dicts.

    A leaf is trainable when `re.fullmatch` of any regex accepts its '/'-joined path.
    Raises ValueError when no leaf matches.
    """
    if isinstance(regexes, str):  # a bare string would be read as one regex per character
        regexes = (regexes,)
    compiled = [re.compile(r) for r in regexes]
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if any(r.fullmatch(k) for r in compiled)}
    if not trainable:
        paths = sorted(flat)
        shown = ", ".join(paths[:5]) + (f", ... ({len(paths)} in all)" if len(paths) > 5 else "")
        raise ValueError(f"trainable regexes {list(regexes)} match no parameter path "
                         f"(re.fullmatch); available paths: {shown or 'none'}")
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    return unflatten(trainable), unflatten(frozen)


def merge_params(trainable: Any, frozen: Any) -> dict[str, Any]:
    """Inverse of `split_params`; raises ValueError when a path is in both."""
    flat_t, flat_f = flatten(trainable), flatten(frozen)
    overlap = sorted(set(flat_t) & set(flat_f))
    if overlap:
        raise ValueError(f"parameters both trainable and frozen: {overlap[:5]}"
                         f"{f' ({len(overlap)} in all)' if len(overlap) > 5 else ''}")
    return unflatten({**flat_f, **flat_t})


def checkpoint_step_offset(checkpoint: str | None = None) -> int:
    """`adafactor.step_offset` as the reference runs it: minus the step of the frozen t5x
    checkpoint (1,100,000 for T5 1.1 lm100k), so that Adafactor's β2 continues from the
    pretraining run's step count instead of restarting at 0.

        adafactor.step_offset = @checkpoint_step_offset()
        checkpoint_step_offset.checkpoint = %INITIAL_CHECKPOINT
    """
    from prompt_jax.checkpoints.t5x import checkpoint_step, is_t5x_checkpoint, latest_step_dir

    if not checkpoint or not (is_t5x_checkpoint(checkpoint) or latest_step_dir(checkpoint)):
        raise ValueError(f"checkpoint_step_offset: {checkpoint!r} is not a t5x checkpoint, "
                         "whose step it reads; a Hugging Face directory records no step: set "
                         "adafactor.step_offset = -STEP (e.g. -1100000 for T5 1.1 lm100k)")
    return -checkpoint_step(checkpoint)


def rsqrt_schedule(base: float = 1.0, warmup_steps: int = 10_000) -> optax.Schedule:
    """T5's pretraining learning rate: base / sqrt(max(step, warmup_steps)) (0.01 for the first
    10,000 steps with the defaults)."""

    def schedule(count):
        return base * jax.lax.rsqrt(jnp.maximum(count.astype(jnp.float32), warmup_steps))

    return schedule
