"""Adafactor against a numpy transcription of the paper's/t5x's update; the trainable split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_jax import optim

# float32 (ours) against float64 (reference): each update entry agrees to RTOL of itself,
# or to RTOL of the update's RMS for entries near 0 (momentum sums that nearly cancel).
RTOL = 2e-6


def reference_adafactor(param, grads, *, lr=0.3, decay_rate=0.8, step_offset=0, clip=1.0,
                        wd=1e-5, eps1=1e-30, eps2=1e-3, min_dim=128, param_scale=False,
                        beta1=None):
    """Shazeer & Stern (2018) Alg. 4/5 with t5x's choices, in float64.

    Returns the list of updates (new - old) and of rms(y) before clipping, per step.
    """
    p = np.asarray(param, np.float64)
    shape = p.shape
    # Factor over the two largest dims when the second largest is >= min_dim; the
    # second largest indexes "rows" (R), the largest "columns" (C).
    order = np.argsort(shape)
    factored = len(shape) == 2 and shape[order[-2]] >= min_dim
    if factored:
        row_ax, col_ax = int(order[-2]), int(order[-1])
        R = np.zeros(shape[row_ax])  # running sums over the column axis
        C = np.zeros(shape[col_ax])  # running sums over the row axis
    else:
        v = np.zeros(shape)
    m = np.zeros(shape)
    updates, rms_before = [], []
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        rate = lr(t) if callable(lr) else lr
        # t5x (and optax) hold β2 in float32; as β2 -> 1, 1 - β2 keeps few digits, so
        # round it the same way here rather than widen the tolerance.
        beta2 = float(np.float32(1.0 - (t + 1 - step_offset) ** (-decay_rate)))
        g2 = g * g + eps1
        if factored:
            R = beta2 * R + (1 - beta2) * g2.sum(axis=col_ax)
            C = beta2 * C + (1 - beta2) * g2.sum(axis=row_ax)
            vhat = np.outer(R, C) / R.sum()  # [rows, cols]: the paper's R C / (1ᵀ R)
            if row_ax == 1:
                vhat = vhat.T
        else:
            v = beta2 * v + (1 - beta2) * g2
            vhat = v
        y = g / np.sqrt(vhat)
        rms = np.sqrt(np.mean(y * y))
        rms_before.append(rms)
        y = y / max(1.0, rms / clip)
        step = rate * y
        if param_scale:
            step = step * max(np.sqrt(np.mean(p * p)), eps2)
        if beta1 is not None:
            m = beta1 * m + (1 - beta1) * step
            step = m
        new = (1 - wd) * p - step
        updates.append(new - p)
        p = new
    return updates, rms_before


def run_ours(tx, param, grads):
    """Apply `tx` for each gradient; return the updates and the final state."""
    param = jnp.asarray(param)
    state = tx.init(param)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(jnp.asarray(g), state, param)
        out.append(np.asarray(u, np.float64))
        param = optax.apply_updates(param, u)
    return out, state


def growing_grads(rng, shape, steps=4):
    # Growing gradients push rms(y) above 1 after the first step, so clipping acts.
    return [rng.normal(size=shape).astype(np.float32) * (1 + 4 * t) for t in range(steps)]


def assert_updates_match(ours, ref):
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        atol = RTOL * np.sqrt(np.mean(b * b))
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=f"step {step}")


@pytest.mark.parametrize(
    "shape, kwargs, factored",
    [
        ((6, 5), {}, False),                                    # small matrix, full v
        ((100, 16), {}, False),                                 # prompt-like, 100 < 128
        ((130, 140), {}, True),                                 # both >= 128: factored
        ((12, 9), {"min_dim_size_to_factor": 8}, True),         # lower threshold
        ((9, 12), {"min_dim_size_to_factor": 8}, True),         # largest dim first
        ((7,), {}, False),                                      # vector
        ((12, 9), {"min_dim_size_to_factor": 8, "multiply_by_parameter_scale": True,
                   "beta1": 0.9, "step_offset": -50}, True),
    ],
)
def test_adafactor_matches_reference(shape, kwargs, factored):
    rng = np.random.default_rng(0)
    param = rng.normal(size=shape).astype(np.float32)
    grads = growing_grads(rng, shape)
    ref_kwargs = {"min_dim": kwargs.get("min_dim_size_to_factor", 128),
                  "param_scale": kwargs.get("multiply_by_parameter_scale", False),
                  "beta1": kwargs.get("beta1"), "step_offset": kwargs.get("step_offset", 0)}
    ref, rms = reference_adafactor(param, grads, **ref_kwargs)
    ours, state = run_ours(optim.adafactor(**kwargs), param, grads)
    assert_updates_match(ours, ref)
    assert max(rms) > 1.1, "clipping should be active in this case"
    v_row = state[0].v_row
    assert (np.ndim(v_row) == 1 and np.size(v_row) > 1) == factored


def test_factored_clipping_active_on_first_step():
    rng = np.random.default_rng(1)
    shape = (130, 140)
    param = rng.normal(size=shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * rng.exponential(size=(1, 140))
             .astype(np.float32)]
    ref, rms = reference_adafactor(param, grads)
    assert rms[0] > 1.0  # β2 = 0 on step 1: unfactored y = sign(g); factored y is not
    assert_updates_match(run_ours(optim.adafactor(), param, grads)[0], ref)


def test_paper_prompt_shapes_factoring():
    state = optim.adafactor().init({"p100": jnp.zeros((100, 768)), "p150": jnp.zeros((150, 768))})
    fact = state[0]
    assert fact.v["p100"].shape == (100, 768) and fact.v_row["p100"].shape == (1,)
    assert fact.v_row["p150"].shape == (150,) and fact.v_col["p150"].shape == (768,)


def test_learning_rate_schedule_counts_from_zero():
    rng = np.random.default_rng(2)
    param = rng.normal(size=(5, 3)).astype(np.float32)
    grads = growing_grads(rng, (5, 3), steps=3)
    schedule = lambda t: 0.3 / (1.0 + t)
    ref, _ = reference_adafactor(param, grads, lr=schedule)
    assert_updates_match(run_ours(optim.adafactor(schedule), param, grads)[0], ref)


def test_weight_decay_not_scaled_by_learning_rate():
    param = jnp.asarray(np.linspace(-2, 3, 12, dtype=np.float32).reshape(3, 4))
    tx = optim.adafactor(0.3, weight_decay_rate=1e-2)
    update, _ = tx.update(jnp.zeros_like(param), tx.init(param), param)
    np.testing.assert_allclose(update, -1e-2 * param, rtol=1e-6)  # new = (1 - wd)·param


def test_state_and_updates_float32_for_bf16_params():
    param = jnp.ones((4, 3), jnp.bfloat16)
    tx = optim.adafactor()
    state = tx.init(param)
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.float32)}
    update, state = tx.update(jnp.full((4, 3), 0.5, jnp.bfloat16), state, param)
    assert update.dtype == jnp.float32
    assert optax.apply_updates(param, update).dtype == jnp.bfloat16


# ---------------------------------------------------------------- trainable subset


def tiny_params():
    return {
        "encoder": {
            "prompt": {"prompt": jnp.ones((4, 8))},
            "layers_0": {"attention": {"query": {"kernel": jnp.full((8, 6), 2.0)}}},
        },
        "decoder": {"layers_0": {"mlp": {"wi": {"kernel": jnp.full((8, 10), 3.0)}}}},
        "token_embedder": {"embedding": jnp.full((11, 8), 4.0)},
    }


def test_flatten_paths_and_round_trip():
    params = tiny_params()
    flat = optim.flatten(params)
    assert sorted(flat) == [
        "decoder/layers_0/mlp/wi/kernel",
        "encoder/layers_0/attention/query/kernel",
        "encoder/prompt/prompt",
        "token_embedder/embedding",
    ]
    assert jax.tree.structure(optim.unflatten(flat)) == jax.tree.structure(params)


def test_split_merge_round_trip():
    params = tiny_params()
    trainable, frozen = optim.split_params(params)
    assert optim.flatten(trainable).keys() == {"encoder/prompt/prompt"}
    assert "encoder/prompt/prompt" not in optim.flatten(frozen)
    merged = optim.merge_params(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=True):
        assert a is b
    everything, nothing = optim.split_params(params, optim.MODEL_TUNING)
    assert nothing == {} and optim.merge_params(everything, nothing).keys() == params.keys()


def test_split_regex_semantics():
    params = tiny_params()
    # re.fullmatch: a bare word does not match inside a path.
    with pytest.raises(ValueError, match="prompt"):
        optim.split_params(params, ("prompt",))
    trainable, _ = optim.split_params(params, [".*query.*", "token_embedder/.*"])
    assert optim.flatten(trainable).keys() == {"encoder/layers_0/attention/query/kernel",
                                               "token_embedder/embedding"}
    trainable, _ = optim.split_params(params, "encoder/.*")  # one string is one regex
    assert len(optim.flatten(trainable)) == 2


def test_split_no_match_message():
    with pytest.raises(ValueError) as err:
        optim.split_params(tiny_params(), ("nothing_here",))
    msg = str(err.value)
    assert "nothing_here" in msg and "encoder/prompt/prompt" in msg


def test_merge_overlap_raises():
    trainable, frozen = optim.split_params(tiny_params())
    with pytest.raises(ValueError, match="encoder/prompt/prompt"):
        optim.merge_params(trainable, optim.merge_params(trainable, frozen))


def test_optimizer_state_only_for_trainable_and_frozen_untouched():
    params = tiny_params()
    trainable, frozen = optim.split_params(params)
    tx = optim.adafactor()
    state = tx.init(trainable)
    shapes = {x.shape for x in jax.tree.leaves(state)}
    assert shapes <= {(), (1,), (4, 8)}, shapes

    def loss(t):
        merged = optim.merge_params(t, frozen)
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(merged))

    grads = jax.grad(loss)(trainable)
    assert optim.flatten(grads).keys() == {"encoder/prompt/prompt"}
    updates, state = tx.update(grads, state, trainable)
    new = optax.apply_updates(trainable, updates)
    assert not np.allclose(new["encoder"]["prompt"]["prompt"], 1.0)
