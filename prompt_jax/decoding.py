"""Autoregressive decoding with the decoder's KV cache.

`encode` once, then one `T5.decode(..., decode=True)` step per token against
the `cache` collection. Tokens after EOS are 0 (padding), as in seqio.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from prompt_jax.t5.model import T5

Array = jax.Array
EOS_ID = 1


def init_cache(model: T5, params: Any, encoded: Array, encoder_mask: Array,
               max_decode_length: int) -> Any:
    """A zeroed cache for decoding up to `max_decode_length` tokens."""
    batch = encoded.shape[0]
    shapes = jax.eval_shape(
        lambda: model.apply({"params": params}, encoded, encoder_mask,
                            jnp.zeros((batch, max_decode_length), jnp.int32), decode=True,
                            method=T5.decode, mutable=["cache"])[1]["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model: T5, params: Any, cache: Any, encoded: Array, encoder_mask: Array,
                tokens: Array) -> tuple[Array, Any]:
    """tokens [B] (the previous output; 0 to start) -> (log-probs [B, V], new cache)."""
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_mask,
                                    tokens[:, None], decode=True, method=T5.decode,
                                    mutable=["cache"])
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id"))
def greedy_decode(model: T5, params: Any, encoder_input_tokens: Array, max_decode_length: int,
                  prefix_embeddings: Array | None = None, prefix_mask: Array | None = None,
                  eos_id: int = EOS_ID) -> tuple[Array, Array]:
    """-> (tokens [B, max_decode_length], sum of the chosen tokens' log-probs [B])."""
    encoded, mask = model.apply({"params": params}, encoder_input_tokens, prefix_embeddings,
                                prefix_mask, method=T5.encode)
    batch = encoder_input_tokens.shape[0]
    cache = init_cache(model, params, encoded, mask, max_decode_length)

    def step(carry, _):
        cache, previous, done, score = carry
        log_probs, cache = decode_step(model, params, cache, encoded, mask, previous)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None],
                                                                  axis=-1)[:, 0])
        token = jnp.where(done, 0, token)
        return (cache, token, done | (token == eos_id), score), token

    start = (cache, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
             jnp.zeros((batch,), jnp.float32))
    (_, _, _, score), tokens = jax.lax.scan(step, start, None, length=max_decode_length)
    return tokens.T, score
