"""Pretraining objectives as token preprocessors: T5's span corruption and LM adaptation.

Both take documents tokenized into `targets` and are random per example through
seqio's seeds (`seqio.map_over_dataset(num_seeds=…)`), so a dataset built with a
seed is the same every time.

Span corruption (Raffel et al. 2020): documents are cut to a random chunk of at
most 65,536 tokens, 128 of them concatenated, and the result split into pieces of
the raw length whose corrupted inputs exactly fill the inputs length (568 raw
tokens for inputs 512, giving targets of 114). In each piece
round(L * 0.15) tokens form round(noise / 3) noise spans, placed uniformly among
the segmentations that alternate non-noise and noise starting with non-noise.
Inputs keep the non-noise tokens with each noise span replaced by one sentinel;
targets are each sentinel followed by its span. Sentinels are `<extra_id_0>`
(V - 1), `<extra_id_1>` (V - 2), … in order of position.

LM adaptation (the "prefix LM" of T5 1.1 LM-adapted): each document is cut to a
random chunk and split into pieces of at most inputs length - 1 tokens; each piece
is split at a point drawn uniformly from [1, n - 1]: inputs = the prefix, targets
= the continuation (truncated to the targets length).

BERT-style (Raffel et al. 2020, Section 3.3.1, Table 4): concatenated documents split
into pieces of inputs length - 1 tokens; i.i.d. 15% of the tokens are corrupted, 90%
of those replaced by the mask token `<extra_id_0>` and 10% by a random ordinary token
(ids 3 … V - 101: no padding, EOS, UNK or sentinel); targets are the whole original
piece. Not in the paper's recipe: at the CPU sizes it makes the decoder read its
encoder (most target tokens are copied), which span corruption and the prefix LM teach
only slowly (docs/pretraining).
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
DEFAULT_INPUTS_LENGTH = 512
MAX_CHUNK = 65536
BERT_MASK_RATE = 0.9  # of the corrupted tokens; the rest become random tokens
SENTINELS = 100
CONCAT_DOCUMENTS = 128


def span_corruption_lengths(
    inputs_length: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
    """(raw tokens per piece, targets length) so corrupted inputs plus EOS fill `inputs_length`.

    The inputs hold the non-noise tokens, one sentinel per span and EOS; the targets
    the noise tokens, one sentinel per span and EOS. `(568, 114)` for 512.
    """

    def lengths(tokens: int) -> tuple[int, int]:
        noise = int(round(tokens * noise_density))
        spans = int(round(noise / mean_noise_span_length))
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length - 1
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def random_spans_noise_mask(
    length: tf.Tensor,
    seeds: tf.Tensor,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.Tensor:
    """Boolean mask [length]: noise spans alternating with non-noise, non-noise first.

    Args:
      length: int32 scalar.
      seeds: int32 [2, 2], stateless seeds for the two segmentations.
    """
    original_length = length
    length = tf.maximum(length, 2)  # at least one noise and one non-noise token
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32)
    num_spans = tf.maximum(num_spans, 1)

    def segment_lengths(num_items, seed):
        # Choose num_spans - 1 of the num_items - 1 gaps as segment starts, uniformly.
        starts = tf.cast(tf.range(num_items - 1) < num_spans - 1, tf.int32)
        starts = tf.pad(seqio.utils.stateless_shuffle(starts, seed), [[1, 0]])
        return tf.math.segment_sum(tf.ones_like(starts), tf.cumsum(starts))

    noise_lengths = segment_lengths(num_noise, seeds[0])
    nonnoise_lengths = segment_lengths(length - num_noise, seeds[1])
    interleaved = tf.reshape(tf.stack([nonnoise_lengths, noise_lengths], axis=1), [-1])
    span_starts = tf.cumsum(interleaved)[:-1]
    is_start = tf.math.unsorted_segment_sum(tf.ones_like(span_starts), span_starts, length)
    return tf.equal(tf.cumsum(is_start) % 2, 1)[:original_length]


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, first_sentinel: int) -> tf.Tensor:
    """Replaces each run of `mask` by one sentinel (first_sentinel, first_sentinel - 1, …)."""
    previous = tf.pad(mask[:-1], [[1, 0]])
    first_of_run = mask & ~previous
    sentinel = first_sentinel + 1 - tf.cumsum(tf.cast(first_of_run, tokens.dtype))
    tokens = tf.where(first_of_run, sentinel, tokens)
    return tf.boolean_mask(tokens, ~(mask & previous))


def corrupt_spans(
    tokens: tf.Tensor,
    seeds: tf.Tensor,
    vocab_size: int,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[tf.Tensor, tf.Tensor]:
    """(inputs, targets) of span corruption for one token sequence [n] (no EOS)."""
    mask = random_spans_noise_mask(tf.size(tokens), seeds, noise_density, mean_noise_span_length)
    sentinel = vocab_size - 1
    return spans_to_sentinels(tokens, mask, sentinel), spans_to_sentinels(tokens, ~mask, sentinel)


def select_random_chunk(dataset: tf.data.Dataset, max_length: int = MAX_CHUNK) -> tf.data.Dataset:
    """Keeps one random piece of at most `max_length` tokens of each non-empty document."""

    @seqio.map_over_dataset(num_seeds=1)
    def fn(x, seed):
        tokens = x["targets"]
        num_pieces = (tf.size(tokens) + max_length - 1) // max_length
        start = max_length * tf.random.stateless_uniform(
            [], seed=seed, maxval=num_pieces, dtype=tf.int32
        )
        return {"targets": tokens[start : start + max_length]}

    return fn(dataset.filter(lambda x: tf.size(x["targets"]) > 0))


def concatenate_documents(
    dataset: tf.data.Dataset, count: int = CONCAT_DOCUMENTS
) -> tf.data.Dataset:
    """Concatenates each run of `count` documents into one token sequence."""
    dataset = dataset.padded_batch(count, padded_shapes={"targets": [-1]})

    def strip_padding(x):
        flat = tf.reshape(x["targets"], [-1])
        return {"targets": tf.boolean_mask(flat, flat != 0)}  # 0 is padding, never a token

    return dataset.map(strip_padding)


def split_tokens(dataset: tf.data.Dataset, length: int) -> tf.data.Dataset:
    """Splits each sequence into pieces of `length` tokens (the last may be shorter)."""

    def pieces(x):
        tokens = x["targets"]
        n = tf.size(tokens)
        count = (n + length - 1) // length
        padded = tf.pad(tokens, [[0, count * length - n]])
        sizes = tf.minimum(length, n - length * tf.range(count))
        return tf.data.Dataset.from_tensor_slices(
            {"targets": tf.reshape(padded, [count, length]), "size": sizes}
        )

    dataset = dataset.filter(lambda x: tf.size(x["targets"]) > 0).flat_map(pieces)
    return dataset.map(lambda x: {"targets": x["targets"][: x["size"]]})


def _inputs_length(sequence_length: Mapping[str, int] | None) -> int:
    return (sequence_length or {}).get("inputs") or DEFAULT_INPUTS_LENGTH


def _denoising(dataset, sequence_length, output_features, corrupt, num_seeds: int,
               piece_length: int, targets_length: int, name: str) -> tf.data.Dataset:
    """Concatenated documents cut into `piece_length`-token pieces, each mapped to (inputs,
    targets) by `corrupt(tokens, seeds [num_seeds, 2], vocab_size)`; `targets_length` is
    what the objective makes, checked against the requested targets length."""
    wanted = (sequence_length or {}).get("targets")
    if wanted is not None and wanted < targets_length:
        raise ValueError(
            f"{name} with inputs length {_inputs_length(sequence_length)} makes "
            f"targets of {targets_length} tokens, more than the targets length {wanted}"
        )
    vocab_size = output_features["targets"].vocabulary.vocab_size

    @seqio.map_over_dataset(num_seeds=num_seeds)
    def fn(x, seeds):
        inputs, targets = corrupt(x["targets"], tf.stack(seeds), vocab_size)
        return {"inputs": inputs, "targets": targets}

    dataset = concatenate_documents(select_random_chunk(dataset))
    return fn(split_tokens(dataset, piece_length))


def span_corruption(dataset, sequence_length, output_features) -> tf.data.Dataset:
    """T5's span corruption with noise density 0.15 and mean span length 3 (module docstring)."""
    tokens_length, targets_length = span_corruption_lengths(_inputs_length(sequence_length))
    return _denoising(dataset, sequence_length, output_features, corrupt_spans, 2,
                      tokens_length, targets_length, "span corruption")


def lm_adaptation(dataset, sequence_length, output_features) -> tf.data.Dataset:
    """Prefix LM: inputs = a random-length prefix of each piece, targets = the rest."""
    del output_features

    @seqio.map_over_dataset(num_seeds=1)
    def split(x, seed):
        tokens = x["targets"]
        n = tf.size(tokens)
        # Prefix length uniform in [1, n - 1] (0 for a one-token piece).
        k = tf.random.stateless_uniform(
            [], seed=seed, minval=tf.minimum(n - 1, 1), maxval=n, dtype=tf.int32
        )
        return {"inputs": tokens[:k], "targets": tokens[k:]}

    pieces = split_tokens(select_random_chunk(dataset), _inputs_length(sequence_length) - 1)
    return split(pieces)


def bert_style_corrupt(
    tokens: tf.Tensor, seeds: tf.Tensor, vocab_size: int, noise_density: float = NOISE_DENSITY
) -> tf.Tensor:
    """Inputs of the BERT-style objective for one token sequence [n] (module docstring)."""
    n = tf.shape(tokens)
    noise = tf.random.stateless_uniform(n, seed=seeds[0]) < noise_density
    use_mask = tf.random.stateless_uniform(n, seed=seeds[1]) < BERT_MASK_RATE
    random_tokens = tf.random.stateless_uniform(
        n, seed=seeds[2], minval=3, maxval=vocab_size - SENTINELS, dtype=tokens.dtype
    )
    corrupted = tf.where(use_mask, tf.constant(vocab_size - 1, tokens.dtype), random_tokens)
    return tf.where(noise, corrupted, tokens)


def bert_style(dataset, sequence_length, output_features) -> tf.data.Dataset:
    """Denoising with targets = the original piece (module docstring)."""
    inputs_length = _inputs_length(sequence_length)

    def corrupt(tokens, seeds, vocab_size):
        return bert_style_corrupt(tokens, seeds, vocab_size), tokens

    return _denoising(dataset, sequence_length, output_features, corrupt, 3,
                      inputs_length - 1, inputs_length, "the BERT-style objective")
