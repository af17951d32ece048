"""P-tuning v1 (Liu et al., "GPT Understands, Too"): the soft tokens `[P, E]` are the output
of a prompt encoder trained jointly with them, over learned input vectors `[P, E]`.

Two reparameterizations, as PEFT's `PromptEncoder` (`encoder_reparameterization_type`):

- `lstm` (the paper): a bidirectional LSTM of `num_layers` layers (hidden size H per
  direction) over the P input vectors, then an MLP `Linear(2H, 2H) -> ReLU -> Linear(2H, E)`;
- `mlp` (PEFT's recommended default): `Linear(E, H) -> ReLU -> Linear(H, H) -> ReLU ->
  Linear(H, E)` on each input vector (`num_layers` is ignored, as in PEFT).

Parameters live under the model's prompt scope `encoder/prompt/` (so the default trainable
regex `.*prompt.*` trains exactly them), named after PEFT's `PromptEncoder`:

    encoder/prompt/embedding                          [P, E]   the input vectors
    encoder/prompt/lstm_head/l{k}[_reverse]/weight_ih [4H, in] torch's LSTM layout, gates
    encoder/prompt/lstm_head/l{k}[_reverse]/weight_hh [4H, H]  i, f, g, o
    encoder/prompt/lstm_head/l{k}[_reverse]/bias_ih   [4H]     (and bias_hh)
    encoder/prompt/mlp_head/layers_{j}/kernel|bias    [in, out] (torch's Linear transposed)

so `torch_state_dict` is PEFT's `prompt_encoder` state dict one to one. After training
only the encoded vectors matter: every prompt a run saves (`prompts/<step>.npy`,
`best_prompt.npy`) is `encoded_prompt(...)` `[P, E]`, which eval, infer, serving and
`export-peft` read as any prompt. There is no dropout in the encoder (PEFT's default
`encoder_dropout=0.0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import prompts
from prompt_jax.t5.config import PROMPT_PATH

Array = jax.Array
KINDS = ("none", "lstm", "mlp")
SCOPE = "encoder/prompt/"  # every P-tuning parameter's path starts with this
EMBEDDING = SCOPE + "embedding"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptEncoderSpec:
    """The prompt's reparameterization (PEFT `PromptEncoderConfig` names in brackets).

    kind: none (prompt tuning: the prompt is the parameter) | lstm | mlp
      [encoder_reparameterization_type]; hidden_size: H, default d_model
      [encoder_hidden_size]; num_layers: LSTM layers [encoder_num_layers].
    """

    kind: str = "none"
    hidden_size: int | None = None
    num_layers: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"PromptEncoderSpec.kind={self.kind!r} is not one of "
                             f"{', '.join(KINDS)}")
        if self.hidden_size is not None and self.hidden_size <= 0:
            raise ValueError(f"PromptEncoderSpec.hidden_size must be positive, got "
                             f"{self.hidden_size}")
        if self.num_layers < 1:
            raise ValueError(f"PromptEncoderSpec.num_layers must be >= 1, got {self.num_layers}")

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def hidden(self, d_model: int) -> int:
        return self.hidden_size or d_model


def _lstm_direction(x: Array, w_ih: Array, w_hh: Array, b_ih: Array, b_hh: Array) -> Array:
    """One direction of torch's LSTM over x [P, in] -> h [P, H] (zero initial state)."""
    hidden = w_hh.shape[1]

    def step(carry, x_t):
        h, c = carry
        gates = x_t @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = jnp.split(gates, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    return jax.lax.scan(step, (zeros, zeros), x)[1]


def _torch_uniform(hidden: int):
    """torch's LSTM init: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = hidden**-0.5
    return lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


class _LSTMDirection(nn.Module):
    """One direction of one layer of torch's LSTM: x [P, in] -> h [P, H]."""

    hidden: int
    reverse: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h4, init = 4 * self.hidden, _torch_uniform(self.hidden)
        w_ih = self.param("weight_ih", init, (h4, x.shape[-1]))
        w_hh = self.param("weight_hh", init, (h4, self.hidden))
        b_ih, b_hh = self.param("bias_ih", init, (h4,)), self.param("bias_hh", init, (h4,))
        if self.reverse:
            return _lstm_direction(x[::-1], w_ih, w_hh, b_ih, b_hh)[::-1]
        return _lstm_direction(x, w_ih, w_hh, b_ih, b_hh)


class _LSTMHead(nn.Module):
    hidden: int
    num_layers: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x [P, in] -> [P, 2H]: each layer's forward and backward outputs, concatenated."""
        for k in range(self.num_layers):
            x = jnp.concatenate([_LSTMDirection(self.hidden, False, name=f"l{k}")(x),
                                 _LSTMDirection(self.hidden, True, name=f"l{k}_reverse")(x)],
                                axis=-1)
        return x


class _MLPHead(nn.Module):
    sizes: tuple[int, ...]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Dense layers with ReLU between them (torch's Sequential(Linear, ReLU, ...))."""
        for j, size in enumerate(self.sizes):
            if j:
                x = jax.nn.relu(x)
            x = nn.Dense(size, name=f"layers_{j}")(x)
        return x


class PromptEncoder(nn.Module):
    """The P-tuning prompt: `() -> [P, E]`, the reparameterization of learned inputs."""

    length: int
    embed_dim: int
    spec: PromptEncoderSpec
    embedding_init: prompts.Initializer = prompts.random_uniform()

    @nn.compact
    def __call__(self) -> Array:
        """-> [P, E] float32."""
        x = self.param("embedding", nn.with_logical_partitioning(self.embedding_init,
                                                    prompts.PROMPT_AXES),
                       (self.length, self.embed_dim))
        hidden = self.spec.hidden(self.embed_dim)
        if self.spec.kind == "lstm":
            x = _LSTMHead(hidden, self.spec.num_layers, name="lstm_head")(x)
            sizes = (2 * hidden, self.embed_dim)
        else:
            sizes = (hidden, hidden, self.embed_dim)
        return _MLPHead(sizes, name="mlp_head")(x)


def torch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The P-tuning params of a flat tree (`encoder/prompt/...`) as PEFT's
    `PromptEncoder.state_dict()` (numpy): `embedding.weight`, `lstm_head.weight_ih_l0`,
    `lstm_head.weight_hh_l0_reverse`, ..., `mlp_head.{0,2,4}.weight|bias`."""
    out = {}
    for name, value in prompt_params(params).items():
        value = np.asarray(value, np.float32)
        parts = name.split("/")
        if parts == ["embedding"]:
            out["embedding.weight"] = value
        elif parts[0] == "lstm_head":  # lstm_head/l0_reverse/weight_ih
            index, _, reverse = parts[1][1:].partition("_")
            out[f"lstm_head.{parts[2]}_l{index}" + ("_reverse" if reverse else "")] = value
        elif parts[0] == "mlp_head":  # mlp_head/layers_1/kernel -> mlp_head.2.weight
            torch_index = 2 * int(parts[1].removeprefix("layers_"))  # Linear, ReLU, ...
            kernel = parts[2] == "kernel"
            out[f"mlp_head.{torch_index}.{'weight' if kernel else 'bias'}"] = \
                value.T if kernel else value
    return out


def prompt_params(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a flat parameter tree that belong to the prompt encoder, with their
    paths relative to its scope (what `PromptEncoder.apply` takes, unflattened)."""
    return {k.removeprefix(SCOPE): v for k, v in flat.items()
            if k.startswith(SCOPE) and k != PROMPT_PATH}


def encoded_prompt(spec: PromptEncoderSpec, flat: Mapping[str, Any]) -> Array:
    """The soft tokens `[P, E]` a flat parameter tree's prompt encoder produces."""
    from prompt_jax.pytree import unflatten

    mine = prompt_params(flat)
    if "embedding" not in mine:
        raise ValueError(f"the parameters hold no {EMBEDDING}: not a P-tuning run")
    length, width = np.shape(mine["embedding"])
    module = PromptEncoder(length, width, spec)
    return module.apply({"params": unflatten(dict(mine))})


def prompt_of(flat: Mapping[str, Any], spec: PromptEncoderSpec | None) -> np.ndarray | None:
    """The prompt `[P, E]` float32 of a flat tree of (trainable) params: the parameter
    itself for prompt tuning, the encoder's output for P-tuning; None without a prompt."""
    if PROMPT_PATH in flat:
        return np.asarray(jax.device_get(flat[PROMPT_PATH]), np.float32)
    if spec is None or not spec.active or EMBEDDING not in flat:
        return None
    host = {k: np.asarray(jax.device_get(v)) for k, v in prompt_params(flat).items()}
    return np.asarray(jax.jit(lambda p: encoded_prompt(spec, {SCOPE + k: v for k, v in
                                                              p.items()}))(host), np.float32)


def initial_params(spec: PromptEncoderSpec, inputs: np.ndarray, rng: jax.Array
                   ) -> dict[str, np.ndarray]:
    """The prompt's first parameters as flat paths: `{PROMPT_PATH: inputs}` for prompt
    tuning; for P-tuning the input vectors `inputs` [P, E] (from the run's `PromptInit`)
    and freshly initialised encoder weights (torch's LSTM init, flax's Dense init)."""
    if not spec.active:
        return {PROMPT_PATH: np.asarray(inputs)}
    from prompt_jax.pytree import flatten

    length, width = inputs.shape
    params = nn.unbox(jax.jit(PromptEncoder(length, width, spec).init)(rng)["params"])
    flat = {SCOPE + k: np.asarray(v) for k, v in flatten(params).items()}
    flat[EMBEDDING] = np.asarray(inputs, np.float32)
    return flat
