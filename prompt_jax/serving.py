"""Serving prompts on one frozen model: rank classification, prompt ensembles,
mixed-task batches, and what a prompt "means" (nearest neighbours).

Prompts reach the frozen model (no `encoder/prompt` param, `prompt_length=0`) as
`prefix_embeddings`. Prompts of different lengths share a batch by LEFT padding
within the prefix (padding, prompt rows, then the input tokens) with
`prefix_mask` False on the padding: T5's attention depends only on relative
positions and masked keys get exactly zero weight, so each row computes what it
would compute alone (up to float summation order). A P-tuning v2 deep prompt's keys
have absolute positions; the encoder counts them from each row's first real position
(`RelativePositionBiases(query_shift=...)`), so the same holds under one.

- `score_targets` / `rank_classify`: candidate targets [B, C, L] scored by total
  log-likelihood in one forward (each example encoded once, its encoding repeated
  across candidates);
- `pack_prompts` / `mixed_batch_prefix`: per-row prompts for a mixed-task batch;
  the result goes to `decoding.greedy_decode`, `decoding.beam_search` or
  `score_targets` as `prefix_embeddings`, `prefix_mask`;
- `ensemble_*`: N prompts for one task in one pass over rows `b * N + n`
  (example b with prompt n); `majority_vote`, mean log-likelihood, `ensemble_report`;
- `nearest_neighbours` / `format_neighbours`: the paper's §7 interpretation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import decoding, losses
from prompt_jax.t5.model import T5

Array = jax.Array
MetricFn = Callable[[Sequence[Any], Sequence[Any]], Mapping[str, float]]


# ---------------------------------------------------------------- rank classification

def score_targets(model: T5, params: Any, encoder_input_tokens: Array, target_tokens: Array,
                  prefix_embeddings: Array | None = None, prefix_mask: Array | None = None
                  ) -> Array:
    """Total log-likelihood of each candidate target -> [B, C].

    encoder_input_tokens [B, T]; target_tokens [B, C, L] (or [C, L], the same
    candidates for every example), each candidate ending in EOS and right-padded
    with 0; an all-padding candidate scores 0. Prefix as for `T5.encode`.
    """
    return _score_targets(model, params, encoder_input_tokens, jnp.asarray(target_tokens),
                          prefix_embeddings, prefix_mask)


# Jitted bodies take every argument positionally: jit keys its cache on how the
# arguments were passed, so the public wrappers keep one calling form.
@functools.partial(jax.jit, static_argnums=0)
def _score_targets(model, params, encoder_input_tokens, target_tokens, prefix_embeddings,
                   prefix_mask):
    batch = encoder_input_tokens.shape[0]
    if target_tokens.ndim == 2:
        target_tokens = jnp.broadcast_to(target_tokens[None], (batch,) + target_tokens.shape)
    candidates, length = target_tokens.shape[1:]
    encoded, mask = model.apply({"params": params}, encoder_input_tokens, prefix_embeddings,
                                prefix_mask, method=T5.encode)
    encoded, mask = jnp.repeat(encoded, candidates, axis=0), jnp.repeat(mask, candidates, axis=0)
    targets = target_tokens.reshape(batch * candidates, length).astype(jnp.int32)
    inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))  # shifted right, 0 = start
    logits = model.apply({"params": params}, encoded, mask, inputs, targets, method=T5.decode)
    weights = losses.loss_weights({"decoder_target_tokens": targets})
    return losses.per_example_log_likelihood(logits, targets, weights).reshape(batch, candidates)


def rank_classify(model: T5, params: Any, encoder_input_tokens: Array, target_tokens: Array,
                  prefix_embeddings: Array | None = None, prefix_mask: Array | None = None
                  ) -> tuple[Array, Array]:
    """-> (index of the most likely candidate [B], scores [B, C]).

    As `score_targets`, but all-padding candidates (fillers where examples have
    fewer candidates than C, see `pad_candidates`) score -inf. Ties go to the
    lowest candidate index.
    """
    return _rank_classify(model, params, encoder_input_tokens, jnp.asarray(target_tokens),
                          prefix_embeddings, prefix_mask)


@functools.partial(jax.jit, static_argnums=0)
def _rank_classify(model, params, encoder_input_tokens, target_tokens, prefix_embeddings,
                   prefix_mask):
    scores = _score_targets(model, params, encoder_input_tokens, target_tokens,
                            prefix_embeddings, prefix_mask)
    present = jnp.any(target_tokens > 0, axis=-1)
    scores = jnp.where(jnp.broadcast_to(present, scores.shape), scores, -jnp.inf)
    return jnp.argmax(scores, axis=-1), scores


def pad_candidates(candidates: Sequence[Sequence[Sequence[int]]], length: int | None = None
                   ) -> np.ndarray:
    """Per-example lists of candidate token ids (EOS included) -> [B, C_max, L] int32.

    Examples with fewer candidates get all-padding rows, which `rank_classify` never picks.
    """
    num = max(len(c) for c in candidates)
    longest = max((len(t) for c in candidates for t in c), default=1)
    length = length or longest
    if longest > length:
        raise ValueError(f"a candidate target has {longest} tokens, more than length={length}")
    out = np.zeros((len(candidates), num, length), np.int32)
    for b, example in enumerate(candidates):
        for c, tokens in enumerate(example):
            out[b, c, : len(tokens)] = tokens
    return out


# ---------------------------------------------------------------- mixed-task batches

def pack_prompts(prompts: Sequence[Array | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts [P_i, E] -> (left-padded prompts [N, P_max, E], mask [N, P_max])."""
    if not prompts:
        raise ValueError("pack_prompts: no prompts given")
    widths = {np.shape(p)[-1] for p in prompts}
    if len(widths) != 1 or any(np.ndim(p) != 2 for p in prompts):
        raise ValueError("pack_prompts: prompts must all be [P_i, E] with one E, got shapes "
                         f"{[tuple(np.shape(p)) for p in prompts]}")
    longest = max(np.shape(p)[0] for p in prompts)
    packed = np.zeros((len(prompts), longest, widths.pop()), np.float32)
    mask = np.zeros((len(prompts), longest), bool)
    for i, prompt in enumerate(prompts):
        n = np.shape(prompt)[0]
        packed[i, longest - n:] = np.asarray(prompt, np.float32)
        mask[i, longest - n:] = True
    return packed, mask


def mixed_batch_prefix(prompts: Array | np.ndarray, prompt_mask: Array | np.ndarray | None,
                       prompt_index: Array | np.ndarray) -> tuple[Array, Array]:
    """Row b uses prompt `prompt_index[b]` -> (prefix_embeddings [B, P, E], prefix_mask [B, P]).

    prompts [N, P, E] and prompt_mask [N, P] (None: all real) as `pack_prompts` returns.
    """
    prompts = jnp.asarray(prompts)
    if prompt_mask is None:
        prompt_mask = jnp.ones(prompts.shape[:2], bool)
    index = jnp.asarray(prompt_index, jnp.int32)
    return prompts[index], jnp.asarray(prompt_mask, bool)[index]


# ---------------------------------------------------------------- prompt ensembles

def ensemble_rows(encoder_input_tokens: Array | np.ndarray, num_prompts: int
                  ) -> tuple[Array, Array]:
    """[B, T] -> (tokens [B*N, T], prompt index [B*N]); row b*N + n is example b, prompt n."""
    tokens = jnp.repeat(jnp.asarray(encoder_input_tokens), num_prompts, axis=0)
    index = jnp.tile(jnp.arange(num_prompts, dtype=jnp.int32), encoder_input_tokens.shape[0])
    return tokens, index


def ensemble_greedy_decode(model: T5, params: Any, encoder_input_tokens: Array,
                           prompts: Array, max_decode_length: int,
                           prompt_mask: Array | None = None, eos_id: int = decoding.EOS_ID
                           ) -> tuple[Array, Array]:
    """N prompts [N, P, E] in one pass -> (tokens [B, N, L], log-likelihoods [B, N]).

    Combine with `majority_vote(tokens)`.
    """
    batch, num = encoder_input_tokens.shape[0], prompts.shape[0]
    tokens, index = ensemble_rows(encoder_input_tokens, num)
    prefix, mask = mixed_batch_prefix(prompts, prompt_mask, index)
    out, scores = decoding.greedy_decode(model, params, tokens, max_decode_length, prefix, mask,
                                         eos_id=eos_id)
    return out.reshape(batch, num, -1), scores.reshape(batch, num)


def ensemble_rank_classify(model: T5, params: Any, encoder_input_tokens: Array,
                           target_tokens: Array, prompts: Array,
                           prompt_mask: Array | None = None) -> dict[str, Array]:
    """N prompts [N, P, E] for one task, rank classification in one pass.

    target_tokens [C, L] (the task's labels) or [B, C, L]. Returns
    numpy arrays: `scores` [B, N, C], `per_prompt` [B, N] (each prompt's choice),
    `majority_vote` [B], `mean_scores` [B, C] (log-likelihoods averaged over
    prompts) and `mean_log_likelihood` [B] (its argmax; ties to the lowest index).
    """
    batch, num = encoder_input_tokens.shape[0], prompts.shape[0]
    tokens, index = ensemble_rows(encoder_input_tokens, num)
    targets = jnp.asarray(target_tokens)
    if targets.ndim == 3:
        targets = jnp.repeat(targets, num, axis=0)
    prefix, mask = mixed_batch_prefix(prompts, prompt_mask, index)
    choice, scores = rank_classify(model, params, tokens, targets, prefix, mask)
    scores = np.asarray(scores).reshape(batch, num, -1)
    per_prompt = np.asarray(choice).reshape(batch, num)
    mean_scores = scores.mean(axis=1)
    return {"scores": scores, "per_prompt": per_prompt,
            "majority_vote": majority_vote(per_prompt)[0], "mean_scores": mean_scores,
            "mean_log_likelihood": mean_scores.argmax(axis=-1)}


def majority_vote(predictions: Array | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """predictions [B, N, ...] (N prompts' outputs) -> (the most common [B, ...], votes [B]).

    Two predictions agree when equal in every trailing element (token sequences,
    labels or strings). Ties go to the prediction of the lowest-numbered prompt
    among the tied ones (as `collections.Counter.most_common` in prompt order).
    """
    p = np.asarray(predictions)
    same = p[:, :, None] == p[:, None, :]  # [B, N, N, ...]
    same = same.reshape(same.shape[:3] + (-1,)).all(axis=-1)
    votes = same.sum(axis=-1)  # [B, N]: how many prompts agree with prompt n
    winner = votes.argmax(axis=-1)  # first maximum = lowest prompt index
    rows = np.arange(p.shape[0])
    return p[rows, winner], votes[rows, winner]


def ensemble_report(metric_fn: MetricFn, targets: Sequence[Any], per_prompt: Sequence[Any],
                    ensembles: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, float]]:
    """Every prompt's metrics and the ensembles'.

    per_prompt [B, N, ...] (prediction of example b by prompt n); ensembles maps a
    name (e.g. "majority_vote", "mean_log_likelihood") to predictions [B, ...].
    -> {"prompt_0": {...}, ..., "prompt_mean": {...}, "prompt_best": {...}, name: {...}};
    mean and best are over prompts, per metric.
    """
    num = len(per_prompt[0])
    report = {f"prompt_{n}": dict(metric_fn(targets, [row[n] for row in per_prompt]))
              for n in range(num)}
    keys = report["prompt_0"].keys()
    report["prompt_mean"] = {k: float(np.mean([report[f"prompt_{n}"][k] for n in range(num)]))
                             for k in keys}
    report["prompt_best"] = {k: float(np.max([report[f"prompt_{n}"][k] for n in range(num)]))
                             for k in keys}
    for name, predictions in ensembles.items():
        report[name] = dict(metric_fn(targets, list(predictions)))
    return report


# ---------------------------------------------------------------- nearest neighbours

def nearest_neighbours(prompt: Array | np.ndarray, embedding: Array | np.ndarray, k: int = 5
                       ) -> tuple[np.ndarray, np.ndarray]:
    """prompt [P, E], embedding [V, E] -> (top-k token ids [P, k], cosine similarities [P, k]).

    Most similar first, per prompt position.
    """
    prompt = jnp.asarray(prompt, jnp.float32)
    embedding = jnp.asarray(embedding, jnp.float32)
    if prompt.ndim != 2 or embedding.ndim != 2 or prompt.shape[1] != embedding.shape[1]:
        raise ValueError(f"nearest_neighbours: prompt {tuple(prompt.shape)} and embedding "
                         f"{tuple(embedding.shape)} must be [P, E] and [V, E] with one E")
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    sims = jnp.dot(unit(prompt), unit(embedding).T, precision=jax.lax.Precision.HIGHEST)
    sims, ids = jax.lax.top_k(sims, k)
    return np.asarray(ids), np.asarray(sims)


def _piece_fn(vocab: Any) -> Callable[[int], str]:
    if callable(vocab):
        return vocab
    sp = getattr(vocab, "tokenizer", vocab)  # a seqio vocabulary or a SentencePieceProcessor
    size = sp.get_piece_size()
    return lambda i: sp.id_to_piece(int(i)) if 0 <= i < size else f"<id {i}>"


def format_neighbours(ids: np.ndarray, sims: np.ndarray, vocab: Any) -> str:
    """A table: one line per prompt position, its top-k tokens as `piece (similarity)`.

    vocab: a seqio `SentencePieceVocabulary`, a `SentencePieceProcessor`, or a
    function id -> piece. Ids past the SentencePiece model (the embedding table's
    padding rows) print as `<id N>`.
    """
    piece = _piece_fn(vocab)
    cells = [[f"{piece(int(i))} ({s:.3f})" for i, s in zip(row_ids, row_sims, strict=True)]
             for row_ids, row_sims in zip(np.asarray(ids), np.asarray(sims), strict=True)]
    k = np.shape(ids)[1]
    header = ["pos"] + [f"neighbour {j + 1}" for j in range(k)]
    rows = [[str(p)] + row for p, row in enumerate(cells)]
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(k + 1)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])
