"""Model features for prompt tuning from the seqio tasks (no jax here: tf, seqio, numpy).

  get_dataset                   task/mixture -> encoder/decoder features, no packing,
                                inputs cut to leave room for the prompt
  count_truncated               how many inputs that cut shortens
  rank_classification_examples  one row per (example, label string), for scoring
  rank_classification_predictions  scores -> predicted label per example

Features (seqio's `EncDecFeatureConverter(pack=False)`), P the prompt length:
  encoder_input_tokens  [inputs - P]   int32, 0-padded, ends in EOS
  decoder_input_tokens  [targets]      int32, targets shifted right (starts at 0)
  decoder_target_tokens [targets]      int32
  decoder_loss_weights  [targets]      int32, 1 on target tokens

Order: with `seed` set, the dataset is the same sequence on every run (source
order, shuffle buffers and the random objectives all follow the seed), so a run
stopped after k steps of batch B resumes on exactly the next examples with
`get_dataset(..., seed=seed).skip(k * B)` (before batching).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from prompt_jax import tasks
from prompt_jax.tasks import benchmarks

_CONVERTER = seqio.EncDecFeatureConverter(pack=False)


def check_name(name: str) -> None:
    """Raise a ValueError with the closest registered names if `name` is not a task/mixture."""
    import difflib

    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    if name not in known:
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"MIXTURE_OR_TASK_NAME={name!r} is not a registered task or "
                         f"mixture{hint} (prompt_jax.tasks lists them)")


def encoder_length(feature_lengths: Mapping[str, int], prompt_length: int) -> int:
    """Tokens left to the input text once the prompt takes its P positions."""
    if set(feature_lengths) != {"inputs", "targets"}:
        raise ValueError(
            f"feature_lengths must have keys inputs and targets, got {dict(feature_lengths)}"
        )
    inputs = feature_lengths["inputs"]
    if prompt_length < 0 or prompt_length >= inputs:
        raise ValueError(
            f"prompt length {prompt_length} must be >= 0 and < the inputs length {inputs} "
            "(the prompt and at least one input token share the encoder)"
        )
    return inputs - prompt_length


def _task_lengths(feature_lengths: Mapping[str, int], prompt_length: int) -> dict[str, int]:
    return {
        "inputs": encoder_length(feature_lengths, prompt_length),
        "targets": feature_lengths["targets"],
    }


def get_dataset(
    task_or_mixture_name: str,
    split: str,
    feature_lengths: Mapping[str, int],
    prompt_length: int,
    *,
    shuffle: bool,
    seed: int | None,
    num_epochs: int | None,
    shard_info: seqio.ShardInfo | None = None,
) -> tf.data.Dataset:
    """Unbatched model features of a task or mixture (see the module docstring).

    Args:
      task_or_mixture_name: a registered name, e.g. "super_glue_rte".
      split: "train", "validation" or "test".
      feature_lengths: {"inputs": encoder length incl. the prompt, "targets": L}.
      prompt_length: P; the input tokens are cut to `inputs - P` (EOS kept last).
      shuffle: shuffle the examples (training).
      seed: makes order and random preprocessing reproducible; None: random.
      num_epochs: passes over the data; None repeats forever.
      shard_info: this host's shard of the examples.
    """
    lengths = _task_lengths(feature_lengths, prompt_length)
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    ds = provider.get_dataset(
        sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info, num_epochs=num_epochs,
    )  # fmt: skip
    return _CONVERTER(ds, lengths)


@dataclasses.dataclass(frozen=True)
class Truncation:
    """How many of a split's inputs are longer than the encoder leaves them."""

    truncated: int
    total: int
    max_tokens: int

    def __str__(self) -> str:
        return f"{self.truncated} of {self.total} inputs truncated to {self.max_tokens} tokens"


def count_truncated(
    task_or_mixture_name: str, split: str, feature_lengths: Mapping[str, int], prompt_length: int,
    max_examples: int | None = None,
) -> Truncation:
    """Reads the split once (unshuffled) and counts the inputs `get_dataset` cuts.

    An input counts when its tokens plus EOS exceed `inputs - prompt_length`. The
    pretraining tasks size their pieces to fit and count 0 of 0. For a mixture, the
    count is over the tasks that have the split. `max_examples` caps the examples read
    per task (large splits: the count is then over their first examples).
    """
    max_tokens = encoder_length(feature_lengths, prompt_length)
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    names = [t.name for t in getattr(provider, "tasks", [provider]) if split in t.splits]
    truncated = total = 0
    for name in names:
        if name in benchmarks.PRETRAINING_TASKS:
            continue
        ds = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length={"inputs": None, "targets": feature_lengths["targets"]},
            split=split, shuffle=False, num_epochs=1, trim_output_features=False,
        )  # fmt: skip
        if max_examples:
            ds = ds.take(max_examples)
        for n in ds.map(lambda x: tf.size(x["inputs"])).as_numpy_iterator():
            total += 1
            truncated += int(n > max_tokens)
    return Truncation(truncated, total, max_tokens)


def rank_classification_examples(
    task_name: str,
    split: str,
    feature_lengths: Mapping[str, int],
    prompt_length: int,
    *,
    shard_info: seqio.ShardInfo | None = None,
) -> tf.data.Dataset:
    """A classification task in rank-classification form, as seqio/T5's `rank_classification`.

    Each example becomes one row per label string of `tasks.class_labels(task_name)`
    (for a `_sentinel` task, the label after `<extra_id_0>`, as the model emits it):
    the same encoder inputs, the label as decoder targets. Besides the model features
    (see the module docstring) each row has:
      example_id   int64, the example's position in the (unshuffled) split or shard
      label_index  int32, which label string this row scores
      is_correct   bool, the label is the example's target (all False when unlabelled)
    The prediction for an example is the label whose row scores highest
    (`rank_classification_predictions`).
    """
    labels = tasks.class_labels(task_name)
    if not labels:
        raise ValueError(f"{task_name} has no fixed label strings to rank")
    lengths = _task_lengths(feature_lengths, prompt_length)
    task = seqio.get_mixture_or_task(task_name)
    vocab = task.output_features["targets"].vocabulary
    prefix = [vocab.vocab_size - 1] if task_name.endswith(benchmarks.SENTINEL_SUFFIX) else []
    # Trimmed as the task's own targets are: at most L - 1 tokens, then EOS.
    candidates = [
        (prefix + list(vocab.encode(label)))[: lengths["targets"] - 1] + [vocab.eos_id]
        for label in labels
    ]
    sizes = tf.constant([len(c) for c in candidates], tf.int32)
    width = max(len(c) for c in candidates)
    candidates = tf.constant([c + [0] * (width - len(c)) for c in candidates], tf.int32)
    label_strings = tf.constant(list(labels))
    num = len(labels)

    def expand(example_id, ex):
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.tile(ex["inputs"][tf.newaxis], [num, 1]),
            "targets": candidates,
            "size": sizes,
            "example_id": tf.fill([num], example_id),
            "label_index": tf.range(num, dtype=tf.int32),
            "is_correct": tf.equal(label_strings, ex["targets_pretokenized"]),
        })  # fmt: skip

    ds = task.get_dataset(lengths, split=split, shuffle=False, shard_info=shard_info)
    ds = ds.enumerate().flat_map(expand)
    ds = ds.map(lambda x: {**x, "targets": x["targets"][: x["size"]]})
    meta = ds.map(lambda x: {k: x[k] for k in ("example_id", "label_index", "is_correct")})
    model = _CONVERTER(ds.map(lambda x: {"inputs": x["inputs"], "targets": x["targets"]}), lengths)
    # The converter maps one to one and keeps the order, so the two line up.
    return tf.data.Dataset.zip(model, meta).map(lambda m, x: {**m, **x})


def rank_classification_predictions(
    example_ids: Sequence[int], label_indices: Sequence[int], scores: Sequence[float]
) -> dict[int, int]:
    """example_id -> label_index of its highest score (e.g. the target log-likelihood)."""
    best: dict[int, tuple[float, int]] = {}
    for e, i, s in zip(np.asarray(example_ids).tolist(), np.asarray(label_indices).tolist(),
                       np.asarray(scores, dtype=np.float64).tolist(), strict=True):  # fmt: skip
        if e not in best or s > best[e][0]:
            best[e] = (s, i)
    return {e: i for e, (s, i) in best.items()}
