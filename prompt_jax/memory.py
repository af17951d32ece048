"""Per-device memory of a (prompt-)tuning run on a `(data, model)` mesh, computed without
allocating: shapes from `jax.eval_shape`, shardings from `partitioning.LOGICAL_AXIS_RULES`.

    report = memory_report(get_config("t5_1_1_xxl"), (4, 8), prompt_length=100)
    print(format_report(report))

What is counted, per device:
  - frozen parameters, stored in `frozen_dtype`;
  - trainable parameters, kept in float32 (the prompt always is);
  - optimizer state: `jax.eval_shape(tx.init, trainable)` (Adafactor by default: a full
    `v` unless an array's second-largest dimension is >= 128, then a row and a column);
  - activations: an estimate, below.
Each array's per-device size is its shape with every sharded dimension divided (rounded
up) by its mesh axes' size, as `partitioning.logical_to_spec` shards it.

Activation estimate: the tensors a backward pass without rematerialisation keeps, per
data shard and microbatch (B = batch / (data · num_microbatches) examples: the step runs
forward and backward on one microbatch at a time). With S = P + input_length encoder positions, L =
target_length, E d_model, H heads, D d_kv, F d_ff, V vocab, `a` the activation dtype's
bytes and probabilities/logits in float32 (as the model computes them):
  per encoder layer:  2 [B,S,E]·a (the two norms' inputs)  + 3 [B,S,H,D]·a (q, k, v)
                      + [B,H,S,S]·4 (softmax output)       + 3 [B,S,F]·a (MLP: wi_0, its
                      activation, wi_1; with ReLU MLPs only 2)
  per decoder layer:  3 [B,L,E]·a + 4 [B,L,H,D]·a (self q, k, v; cross q)
                      + 2 [B,S,H,D]·a (cross k, v) + [B,H,L,L]·4 + [B,H,L,S]·4 + 3 [B,L,F]·a
  once:               [B,S,E]·a + [B,L,E]·a (final norms' inputs) + [B,L,V]·4 (logits)
That is what the gradient with respect to the *inputs* needs (prompt tuning computes no
weight gradients). When a matrix weight is trainable (model tuning), the matmuls' inputs
are kept too: per encoder layer + 2 [B,S,E]·a + [B,S,H,D]·a + [B,S,F]·a, per decoder layer
+ 3 [B,L,E]·a + 2 [B,L,H,D]·a + [B,L,F]·a. Heads, d_ff and vocab dimensions are divided
by the model-axis size as the rules shard them.

With a `remat_policy` (`prompt_jax.t5.model`) a layer keeps less, and the backward pass
recomputes one layer at a time, so one layer's tensors above (the larger of an encoder's
and a decoder's) are counted once on top:
  full: per layer its input only, [B,S,E]·a (encoder) or [B,L,E]·a (decoder; the encoded
        [B,S,E] all decoder layers read is counted once, with the final norms' inputs);
  dots: the input and the outputs of the matmuls without batch dimensions:
        per encoder layer  2 [B,S,E]·a (input, attention out) + 3 [B,S,H,D]·a (q, k, v)
                           + 2 [B,S,F]·a (wi_0, wi_1; ReLU: 1) + [B,S,E]·a (wo),
        per decoder layer  3 [B,L,E]·a (input, two attention outs) + 4 [B,L,H,D]·a
                           + 2 [B,S,H,D]·a + 2 [B,L,F]·a (ReLU: 1) + [B,L,E]·a (wo).
Model tuning adds the kept matmul inputs above under `none` only (under `full`/`dots` they
are recomputed or are among the saved dot outputs). Not counted: dropout masks (1 byte per
element of each dropped tensor), XLA's temporaries, the compiled program. Against XLA's
own `memory_analysis()` of the compiled step on CPU (tests/test_memory.py, small configs,
XLA's memory-minimising scheduler): parameters and optimizer state exact; the compiled
temporaries 0.74x..1.95x this activation estimate (`dots` over-, `none`/`full` under-
counted), so leave the activations a 2x margin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from prompt_jax import optim
from prompt_jax.partitioning import (
    LOGICAL_AXIS_RULES,
    MESH_AXES,
    Rules,
    check_batch_size,
    logical_to_spec,
    opt_state_specs,
    params_specs,
)
from prompt_jax.t5.config import REMAT_POLICIES, T5Config
from prompt_jax.t5.model import abstract_params
from prompt_jax.train_step import check_num_microbatches


@dataclasses.dataclass(frozen=True)
class Entry:
    """`count` elements taking `global_bytes` in all, `device_bytes` on each device."""

    count: int
    global_bytes: int
    device_bytes: int


@dataclasses.dataclass(frozen=True)
class Report:
    mesh_shape: tuple[int, int]
    frozen_params: Entry
    trainable_params: Entry
    optimizer_state: Entry
    activations: Entry
    settings: dict[str, Any]

    @property
    def device_bytes(self) -> int:
        return sum(e.device_bytes for e in (self.frozen_params, self.trainable_params,
                                            self.optimizer_state, self.activations))


def _device_elements(shape: Sequence[int], spec: Any, axis_sizes: dict[str, int]) -> int:
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        n *= -(-dim // math.prod(axis_sizes[a] for a in axes))
    return n


def _entry(shapes: Sequence[tuple[Sequence[int], Any, int]], axis_sizes: dict[str, int]) -> Entry:
    """Sum over (shape, spec, itemsize)."""
    count = sum(math.prod(s) for s, _, _ in shapes)
    return Entry(count=count,
                 global_bytes=sum(math.prod(s) * b for s, _, b in shapes),
                 device_bytes=sum(_device_elements(s, p, axis_sizes) * b for s, p, b in shapes))


def _activation_tensors(cfg: T5Config, batch: int, enc_len: int, dec_len: int, a: int,
                        weight_grads: bool, remat_policy: str = "none"
                        ) -> list[tuple[tuple[int, ...], tuple, int]]:
    """(shape, logical axes, itemsize) of each kept tensor; see the module docstring."""
    B, S, L, E, H, D, F, V = (batch, enc_len, dec_len, cfg.d_model, cfg.num_heads, cfg.d_kv,
                              cfg.d_ff, cfg.vocab_size)
    mlp_kept = 3 if cfg.gated_gelu else 2
    emb, heads, mlp = ("batch", "length", "embed"), ("batch", "length", "heads", "kv"), \
        ("batch", "length", "mlp")
    probs = ("batch", "heads", "length", None)
    enc = [((B, S, E), emb, a)] * 2 + [((B, S, H, D), heads, a)] * 3 \
        + [((B, H, S, S), probs, 4)] + [((B, S, F), mlp, a)] * mlp_kept
    dec = [((B, L, E), emb, a)] * 3 + [((B, L, H, D), heads, a)] * 4 \
        + [((B, S, H, D), heads, a)] * 2 + [((B, H, L, L), probs, 4), ((B, H, L, S), probs, 4)] \
        + [((B, L, F), mlp, a)] * mlp_kept
    if weight_grads:
        enc += [((B, S, E), emb, a)] * 2 + [((B, S, H, D), heads, a), ((B, S, F), mlp, a)]
        dec += [((B, L, E), emb, a)] * 3 + [((B, L, H, D), heads, a)] * 2 + [((B, L, F), mlp, a)]
    once = [((B, S, E), emb, a), ((B, L, E), emb, a),
            ((B, L, V), ("batch", "length", "vocab"), 4)]
    if remat_policy != "none":
        # One layer recomputed at a time: its full set once, on top of what each layer keeps.
        size = lambda ts: sum(math.prod(s) * b for s, _, b in ts)
        once += max(enc, dec, key=size)
        mlp_dots = mlp_kept - 1  # wi_0, wi_1 (gated) or wi
        if remat_policy == "full":
            enc, dec = [((B, S, E), emb, a)], [((B, L, E), emb, a)]
        else:
            enc = [((B, S, E), emb, a)] * 3 + [((B, S, H, D), heads, a)] * 3 \
                + [((B, S, F), mlp, a)] * mlp_dots
            dec = [((B, L, E), emb, a)] * 4 + [((B, L, H, D), heads, a)] * 4 \
                + [((B, S, H, D), heads, a)] * 2 + [((B, L, F), mlp, a)] * mlp_dots
    return enc * cfg.num_encoder_layers + dec * cfg.num_decoder_layers + once


def memory_report(config: T5Config, mesh_shape: tuple[int, int], *, prompt_length: int = 100,
                  trainable_regexes: Sequence[str] = optim.DEFAULT_TRAINABLE,
                  batch_size: int = 32, input_length: int = 512, target_length: int = 8,
                  frozen_dtype: Any = "bfloat16", activation_dtype: Any = "bfloat16",
                  tx: optax.GradientTransformation | None = None,
                  num_microbatches: int = 1, remat_policy: str | None = None,
                  rules: Rules = LOGICAL_AXIS_RULES, model: Any = None) -> Report:
    """Per-device memory of training `T5(config, prompt_length)` (or `model`, a method's
    T5 with its own parameters: P-tuning's encoder, deep prompts, multi-task prompts) on a
    `mesh_shape` mesh.

    `input_length` counts the text tokens only (TASK_FEATURE_LENGTHS['inputs']); the encoder
    sees `prompt_length + input_length`. `num_microbatches` as `train.num_microbatches`;
    `remat_policy` defaults to `config.remat_policy`.
    `tx` defaults to `optim.adafactor()`. Needs no devices of that mesh.
    """
    if len(mesh_shape) != 2 or any(int(s) < 1 for s in mesh_shape):
        raise ValueError(f"mesh {tuple(mesh_shape)}: a dry run needs two positive sizes "
                         "(data, model)")
    axis_sizes = dict(zip(MESH_AXES, (int(s) for s in mesh_shape), strict=True))
    check_batch_size(batch_size, axis_sizes["data"], "batch size")
    check_num_microbatches(batch_size, axis_sizes["data"], num_microbatches)
    remat_policy = config.remat_policy if remat_policy is None else remat_policy
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={remat_policy!r} is not one of {REMAT_POLICIES}")
    boxed = abstract_params(config, prompt_length, boxed=True, model=model)
    specs = params_specs(boxed, axis_sizes, rules)
    abstract = nn.unbox(boxed)
    trainable, frozen = optim.split_params(abstract, trainable_regexes)
    t_specs, f_specs = optim.split_params(specs, trainable_regexes)

    def param_entry(tree, spec_tree, itemsize):
        spec_of = optim.flatten(spec_tree)
        return _entry([(x.shape, spec_of[k], itemsize) for k, x in optim.flatten(tree).items()],
                      axis_sizes)

    frozen_entry = param_entry(frozen, f_specs, jnp.dtype(frozen_dtype).itemsize)
    trainable32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)
    trainable_entry = param_entry(trainable32, t_specs, 4)

    tx = optim.adafactor() if tx is None else tx
    state = jax.eval_shape(tx.init, trainable32)
    state_specs = opt_state_specs(tx, trainable32, t_specs)
    opt_entry = _entry([(x.shape, s, x.dtype.itemsize) for x, s in zip(
        jax.tree.leaves(state), jax.tree.leaves(state_specs, is_leaf=lambda s: isinstance(
            s, jax.sharding.PartitionSpec)), strict=True)], axis_sizes)

    weight_grads = any(len(x.shape) >= 2 and "prompt" not in k
                       for k, x in optim.flatten(trainable).items())
    tensors = _activation_tensors(config, batch_size // num_microbatches,
                                  prompt_length + input_length, target_length,
                                  jnp.dtype(activation_dtype).itemsize, weight_grads,
                                  remat_policy)
    act_entry = _entry([(s, logical_to_spec(n, s, axis_sizes, rules, "activation"), b)
                        for s, n, b in tensors], axis_sizes)
    settings = dict(prompt_length=prompt_length, trainable=list(trainable_regexes),
                    batch_size=batch_size, input_length=input_length,
                    target_length=target_length, frozen_dtype=jnp.dtype(frozen_dtype).name,
                    activation_dtype=jnp.dtype(activation_dtype).name,
                    num_microbatches=num_microbatches, remat_policy=remat_policy)
    return Report(tuple(int(s) for s in mesh_shape), frozen_entry, trainable_entry, opt_entry,
                  act_entry, settings)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(report: Report) -> str:
    """A readable table of `report`."""
    data, model = report.mesh_shape
    s = report.settings
    lines = [
        f"mesh (data={data}, model={model}), {data * model} devices; batch {s['batch_size']}, "
        f"inputs {s['input_length']} + prompt {s['prompt_length']}, targets "
        f"{s['target_length']}; frozen {s['frozen_dtype']}, activations "
        f"{s['activation_dtype']}; trainable {s['trainable']}; "
        f"{s['num_microbatches']} microbatch(es) of {s['batch_size'] // s['num_microbatches']}, "
        f"remat {s['remat_policy']}",
        f"{'':<28}{'elements':>16}{'global':>14}{'per device':>14}",
    ]
    rows = [("frozen parameters", report.frozen_params),
            ("trainable parameters", report.trainable_params),
            ("optimizer state", report.optimizer_state),
            ("activations (estimate)", report.activations)]
    for name, e in rows:
        lines.append(f"{name:<28}{e.count:>16,}{human_bytes(e.global_bytes):>14}"
                     f"{human_bytes(e.device_bytes):>14}")
    lines.append(f"{'total per device':<28}{'':>16}{'':>14}{human_bytes(report.device_bytes):>14}")
    return "\n".join(lines)
