"""Autoregressive decoding with the decoder's KV cache: greedy, sampling and beam search.

`encode` once, then one `T5.decode(..., decode=True)` step per token against
the `cache` collection (`init_cache`): per decoder layer, the self-attention keys
and values written so far, and the cross-attention keys and values of the encoder
output, projected once when the cache is made. Tokens after EOS are 0 (padding),
as in seqio. The loops are `lax.while_loop`s that stop as soon as every sequence
is done; the results are those of running all `max_decode_length` steps.

Sampling (`sample_decode`) draws row b's token at step t with the key
`fold_in(PRNGKey(seed[b]), t)`: a row's tokens are a function of its own inputs,
prompt and seed, whatever else is in the batch and wherever the row is in it.

Beam search follows Hugging Face `generate(num_beams=K)` step for step (the
top 2K continuations of all beams; the best K that did not just end stay live;
those among the top K that end with EOS or at `max_decode_length` enter the
finished set with their length-penalised score; a batch item stops per
`early_stopping`), and gives the same tokens as HF on the parity models.
The length penalty divides a hypothesis' summed log-probability by

- `length_penalty_style="hf"`: `n ** alpha` (HF's `length_penalty=alpha`);
- `length_penalty_style="t5x"`: `((5 + n) / 6) ** alpha` (T5X's brevity penalty,
  default `alpha=0.6`),

where n counts the generated tokens, EOS included. T5X's `decoding.beam_search(alpha)`
corresponds to `length_penalty_style="t5x", early_stopping="never"` (keep searching
while a live beam, penalised at the maximum length, could still beat the worst
finished one). Two T5X details differ: T5X lets an EOS among all top-2K
candidates (not only the top K) into the finished set, and it returns live
beams for an item where none ended with EOS, where this search (like HF)
counts beams that reach `max_decode_length` as finished.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from prompt_jax.t5.model import T5

Array = jax.Array
EOS_ID = 1
# HF's "effectively minus infinity" for beam scores; kept identical so that the
# float32 sums it takes part in round the same way.
_NEG = -1.0e9
_EARLY_STOPPING = (True, False, "never")
_STYLES = ("hf", "t5x")


def init_cache(model: T5, params: Any, encoded: Array, encoder_mask: Array,
               max_decode_length: int) -> Any:
    """The cache for decoding up to `max_decode_length` (L) tokens from encoded [B, S, E].

    Per layer `layers_i`: `self_attention/{cached_key, cached_value}` [B, L, H, D] zeroed
    and its `cache_index`; `encoder_decoder_attention/{cached_cross_key,
    cached_cross_value}` [B, S, H, D], the encoder output's keys and values; and the
    decoder's `position`.
    """
    return _init_cache(model, params, encoded, encoder_mask, max_decode_length)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _init_cache(model, params, encoded, encoder_mask, max_decode_length):
    # The decode-mode call that creates the cache runs the decoder on dummy tokens; nothing
    # reads that output, so XLA drops it, and what is computed is the cross-attention
    # projection of `encoded` (the self-attention entries are constant zeros).
    tokens = jnp.zeros((encoded.shape[0], max_decode_length), jnp.int32)
    _, variables = model.apply({"params": params}, encoded, encoder_mask, tokens, decode=True,
                               method=T5.decode, mutable=["cache"])
    return variables["cache"]


def decode_step(model: T5, params: Any, cache: Any, encoded: Array, encoder_mask: Array,
                tokens: Array) -> tuple[Array, Any]:
    """tokens [B] (the previous output; 0 to start) -> (log-probs [B, V], new cache)."""
    logits, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_mask,
                                    tokens[:, None], decode=True, method=T5.decode,
                                    mutable=["cache"])
    return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32)), variables["cache"]


def greedy_decode(model: T5, params: Any, encoder_input_tokens: Array, max_decode_length: int,
                  prefix_embeddings: Array | None = None, prefix_mask: Array | None = None,
                  eos_id: int = EOS_ID) -> tuple[Array, Array]:
    """-> (tokens [B, max_decode_length], sum of the chosen tokens' log-probs [B])."""
    return _greedy_decode(model, params, encoder_input_tokens, max_decode_length,
                          prefix_embeddings, prefix_mask, eos_id)


def sample_decode(model: T5, params: Any, encoder_input_tokens: Array, max_decode_length: int,
                  prefix_embeddings: Array | None = None, prefix_mask: Array | None = None, *,
                  temperature: float | Array = 1.0, top_k: int | Array = 0,
                  top_p: float | Array = 1.0, seed: int | Array = 0,
                  eos_id: int = EOS_ID) -> tuple[Array, Array]:
    """Sampling -> (tokens [B, max_decode_length], sum of the drawn tokens' log-probs [B]).

    Each step draws from softmax(logits / temperature) cut to the `top_k` most likely
    tokens (0: no cut), then to the smallest set of the most likely whose probability
    (renormalised after the top-k cut) reaches `top_p` (HF's order; ties at either
    boundary are kept). `temperature=0` takes the argmax: `greedy_decode`'s tokens.
    `temperature`, `top_k`, `top_p` and `seed` are each a scalar or one value per row
    [B] (a server batches requests of different settings); they are traced, so changing
    them does not recompile. Row b's draws come from `PRNGKey(seed[b])` alone (see the
    module docstring): the same seed gives the same tokens, alone or in any batch; a
    scalar seed gives every row the same stream, so pass e.g. `seed + jnp.arange(B)` for
    independent samples of one input. The score is under the model's own distribution
    (neither tempered nor cut), as for greedy and beam search.
    """
    rows = (encoder_input_tokens.shape[0],)
    options = (jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), rows),
               jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), rows),
               jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), rows),
               jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), rows))
    return _sample_decode(model, params, encoder_input_tokens, max_decode_length,
                          prefix_embeddings, prefix_mask, eos_id, *options)


# The jitted bodies take every argument positionally: jit keys its cache on how the
# static arguments were passed, so the public wrappers keep one calling form.
@functools.partial(jax.jit, static_argnums=(0, 3, 6))
def _greedy_decode(model, params, encoder_input_tokens, max_decode_length, prefix_embeddings,
                   prefix_mask, eos_id):
    argmax = lambda log_probs, step: jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    return _decode(model, params, encoder_input_tokens, max_decode_length, prefix_embeddings,
                   prefix_mask, eos_id, argmax)


@functools.partial(jax.jit, static_argnums=(0, 3, 6))
def _sample_decode(model, params, encoder_input_tokens, max_decode_length, prefix_embeddings,
                   prefix_mask, eos_id, temperature, top_k, top_p, seed):
    keys = jax.vmap(jax.random.PRNGKey)(seed)
    draw = lambda log_probs, step: draw_tokens(log_probs, jax.vmap(jax.random.fold_in, (0, None))(
        keys, step), temperature, top_k, top_p)
    return _decode(model, params, encoder_input_tokens, max_decode_length, prefix_embeddings,
                   prefix_mask, eos_id, draw)


def draw_tokens(log_probs: Array, keys: Array, temperature: Array, top_k: Array,
                top_p: Array) -> Array:
    """One token per row of log_probs [B, V], with keys [B] and per-row options [B] -> [B]:
    temperature, then top-k, then top-p on the renormalised top-k distribution (HF's
    order); a row with temperature 0 takes the argmax (greedy)."""
    x = log_probs / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def cut(x):
        ranked = -jnp.sort(-x, axis=-1)
        kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, x.shape[-1] - 1)[:, None], -1)
        below_k = lambda v: (top_k[:, None] > 0) & (v < kth)
        x, ranked = jnp.where(below_k(x), -jnp.inf, x), jnp.where(below_k(ranked), -jnp.inf, ranked)
        probs = jax.nn.softmax(ranked, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass ranked above each token
        # The most likely token is always kept; top_p = 1 keeps everything, exactly.
        keep = (before < top_p[:, None]) | (jnp.arange(x.shape[-1]) == 0) | (top_p[:, None] >= 1)
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x < cutoff, -jnp.inf, x)

    # The sort only where some row cuts; the rows that do not are left exactly as they are.
    x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), cut, lambda x: x, x)
    drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, jnp.argmax(log_probs, axis=-1).astype(jnp.int32))


def _decode(model, params, encoder_input_tokens, max_decode_length, prefix_embeddings,
            prefix_mask, eos_id, choose):
    """The greedy and sampling loop; `choose(log_probs [B, V], step) -> tokens [B]`."""
    encoded, mask = model.apply({"params": params}, encoder_input_tokens, prefix_embeddings,
                                prefix_mask, method=T5.encode)
    batch = encoder_input_tokens.shape[0]
    cache = init_cache(model, params, encoded, mask, max_decode_length)

    def cond(carry):
        step, _, _, done, _, _ = carry
        return (step < max_decode_length) & ~jnp.all(done)

    def body(carry):
        step, cache, previous, done, score, tokens = carry
        log_probs, cache = decode_step(model, params, cache, encoded, mask, previous)
        token = choose(log_probs, step)
        score = score + jnp.where(done, 0.0, jnp.take_along_axis(log_probs, token[:, None],
                                                                  axis=-1)[:, 0])
        token = jnp.where(done, 0, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, cache, token, done | (token == eos_id), score, tokens

    start = (jnp.array(0, jnp.int32), cache, jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.float32),
             jnp.zeros((batch, max_decode_length), jnp.int32))
    *_, score, tokens = jax.lax.while_loop(cond, body, start)
    return tokens, score


def _penalty(length: Array, alpha: Array, t5x_style: Array) -> Array:
    """What a summed log-probability of `length` generated tokens is divided by."""
    length, alpha = jnp.asarray(length, jnp.float32), jnp.asarray(alpha, jnp.float32)
    return jnp.where(t5x_style, ((5.0 + length) / 6.0) ** alpha, length**alpha)


def _reorder(cache: Any, rows: Array) -> Any:
    """The cache's beam rows `rows` [B*K]. The cross-attention keys and values stay: every
    beam of an example holds the same ones, and `rows` only moves beams within an example."""
    def pick(path, x):
        if x.ndim == 0 or str(getattr(path[-1], "key", "")).startswith("cached_cross_"):
            return x
        return x[rows]

    return jax.tree_util.tree_map_with_path(pick, cache)


def _gather(x: Array, indices: Array) -> Array:
    """x [B, N, ...] gathered along axis 1 by indices [B, K] -> [B, K, ...]."""
    return jnp.take_along_axis(x, indices.reshape(indices.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(model: T5, params: Any, encoder_input_tokens: Array, max_decode_length: int,
                num_beams: int = 4, length_penalty: float = 0.6,
                prefix_embeddings: Array | None = None, prefix_mask: Array | None = None,
                eos_id: int = EOS_ID, length_penalty_style: str = "t5x",
                early_stopping: bool | str = "never") -> tuple[Array, Array]:
    """Beam search -> (tokens [B, K, max_decode_length], scores [B, K]), best beam first.

    K = `num_beams`; the best hypothesis of example b is `tokens[b, 0]`. Scores are the
    summed log-probabilities divided by the length penalty (`length_penalty` is its
    exponent alpha; see the module docstring for the two styles). `early_stopping` is
    HF's: True stops an example once K hypotheses finished; False once the best live
    beam, penalised at its current length, cannot beat the worst finished one;
    "never" does the same test at `max_decode_length` when alpha > 0.
    HF's defaults are `length_penalty_style="hf", length_penalty=1.0, early_stopping=False`.
    Only the model, the lengths, K and `eos_id` are compiled in; the other options are
    traced, so changing them does not recompile.
    """
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ValueError(f"early_stopping must be one of {_EARLY_STOPPING}, got "
                         f"{early_stopping!r}")
    if length_penalty_style not in _STYLES:
        raise ValueError(f"length_penalty_style must be one of {_STYLES}, got "
                         f"{length_penalty_style!r}")
    if num_beams < 1 or max_decode_length < 1:
        raise ValueError(f"beam_search needs num_beams >= 1 and max_decode_length >= 1, got "
                         f"{num_beams} and {max_decode_length}")
    options = (jnp.float32(length_penalty), jnp.bool_(length_penalty_style == "t5x"),
               jnp.bool_(early_stopping is True), jnp.bool_(early_stopping == "never"))
    return _beam_search(model, params, encoder_input_tokens, max_decode_length, num_beams,
                        *options, prefix_embeddings, prefix_mask, eos_id)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 11))
def _beam_search(model, params, encoder_input_tokens, max_decode_length, num_beams, alpha,
                 t5x_style, stop_when_full, never, prefix_embeddings, prefix_mask, eos_id):
    penalty = functools.partial(_penalty, alpha=alpha, t5x_style=t5x_style)
    encoded, mask = model.apply({"params": params}, encoder_input_tokens, prefix_embeddings,
                                prefix_mask, method=T5.encode)
    batch, k, length = encoder_input_tokens.shape[0], num_beams, max_decode_length
    # Beams of example b are rows b*K .. b*K+K-1 of the flat decoder batch; the cross-attention
    # keys and values are projected once per example, then repeated.
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0) if x.ndim else x,
                         init_cache(model, params, encoded, mask, length))
    encoded, mask = jnp.repeat(encoded, k, axis=0), jnp.repeat(mask, k, axis=0)
    top_k_of_2k = jnp.arange(2 * k) < k

    def cond(state):
        step, done = state[0], state[-1]
        return (step < length) & ~jnp.all(done)

    def body(state):
        (step, cache, live_seqs, live_scores, seqs, scores, finished, improvable, _) = state
        previous = jnp.where(step > 0, live_seqs[:, :, jnp.maximum(step - 1, 0)], 0)
        log_probs, cache = decode_step(model, params, cache, encoded, mask, previous.reshape(-1))
        vocab = log_probs.shape[-1]
        log_probs = log_probs.reshape(batch, k, vocab) + live_scores[:, :, None]
        top_scores, top_ids = jax.lax.top_k(log_probs.reshape(batch, k * vocab), 2 * k)
        source, token = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
        candidates = _gather(live_seqs, source).at[:, :, step].set(token)
        ends = (token == eos_id) | (step + 1 >= length)

        # Live beams: the best K candidates that did not just end.
        running = top_scores + ends.astype(jnp.float32) * _NEG
        _, keep = jax.lax.top_k(running, k)
        live_seqs, live_scores = _gather(candidates, keep), _gather(running, keep)
        rows = (jnp.arange(batch)[:, None] * k + _gather(source, keep)).reshape(-1)
        cache = _reorder(cache, rows)

        # Finished set: merge the candidates among the top K that just ended.
        just_finished = ends & top_k_of_2k[None]
        new_scores = top_scores / penalty(step + 1)
        full = jnp.all(finished, axis=1, keepdims=True) & stop_when_full
        new_scores = new_scores + full.astype(jnp.float32) * _NEG
        new_scores = new_scores + (~improvable).astype(jnp.float32)[:, None] * _NEG
        new_scores = new_scores + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([scores, new_scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        seqs = _gather(jnp.concatenate([seqs, candidates], axis=1), best)
        finished = _gather(jnp.concatenate([finished, just_finished], axis=1), best)
        scores = _gather(merged_scores, best)

        # Can the best live beam still beat the worst finished hypothesis?
        hypothetical = jnp.where(never & (alpha > 0), length, step + 1)
        best_live = live_scores[:, :1] / penalty(hypothetical)
        worst = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        improvable = improvable & jnp.any(best_live > worst, axis=1)
        done = ~improvable | (stop_when_full & jnp.all(finished, axis=1))
        return (step + 1, cache, live_seqs, live_scores, seqs, scores, finished, improvable,
                done)

    zeros = jnp.zeros((batch, k, length), jnp.int32)
    live_scores = jnp.where(jnp.arange(k) == 0, 0.0, _NEG) * jnp.ones((batch, 1), jnp.float32)
    start = (jnp.array(0, jnp.int32), cache, zeros, live_scores, zeros,
             jnp.full((batch, k), _NEG, jnp.float32), jnp.zeros((batch, k), bool),
             jnp.ones((batch,), bool), jnp.zeros((batch,), bool))
    state = jax.lax.while_loop(cond, body, start)
    return state[4], state[5]
