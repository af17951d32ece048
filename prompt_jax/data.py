"""Model features for prompt tuning from the seqio tasks (no jax here: tf, seqio, numpy).

  get_dataset         task/mixture -> encoder/decoder features, no packing
  length_stats        a split's longest inputs/targets, and how many the lengths cut
  check_lengths       TASK_FEATURE_LENGTHS is {'inputs': int, 'targets': int}

Lengths (the prompt-tuning reference's semantics): `TASK_FEATURE_LENGTHS['inputs']` is the
budget of the input TEXT; the model prepends its P prompt positions on top, so the
encoder sees P + inputs positions (the reference's `add_fake_prompt`).

Features (seqio's `EncDecFeatureConverter(pack=False)`):
  encoder_input_tokens  [inputs]       int32, 0-padded, ends in EOS
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
from collections.abc import Mapping

import seqio
import tensorflow as tf

from prompt_jax import tasks  # noqa: F401 (registers the tasks)
from prompt_jax.methods import templates
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


def check_lengths(feature_lengths: Mapping[str, int]) -> dict[str, int]:
    """TASK_FEATURE_LENGTHS as a plain dict, or a ValueError saying what is wrong."""
    if not isinstance(feature_lengths, Mapping) or set(feature_lengths) != {"inputs",
                                                                            "targets"}:
        raise ValueError(f"TASK_FEATURE_LENGTHS must be a dict with keys 'inputs' and "
                         f"'targets', got {feature_lengths!r}")
    for key, value in feature_lengths.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"TASK_FEATURE_LENGTHS['{key}'] must be a positive integer, got "
                             f"{value!r}")
    return dict(feature_lengths)


def get_dataset(
    task_or_mixture_name: str,
    split: str,
    feature_lengths: Mapping[str, int],
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
      feature_lengths: {"inputs": text tokens (the prompt comes on top), "targets": L};
        longer inputs and targets are cut (EOS kept last). With a template's soft tokens
        the inputs are built `inputs + soft count` long (the soft tokens on top).
      shuffle: shuffle the examples (training).
      seed: makes order and random preprocessing reproducible; None: random.
      num_epochs: passes over the data; None repeats forever.
      shard_info: this host's shard of the examples.
    """
    lengths = check_lengths(feature_lengths)
    # A template's soft tokens come on top of the text budget (methods/templates.py).
    lengths = templates.feature_lengths(task_or_mixture_name, lengths)
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    ds = provider.get_dataset(
        sequence_length=lengths, split=split, shuffle=shuffle, seed=seed,
        shard_info=shard_info, num_epochs=num_epochs,
    )  # fmt: skip
    return _CONVERTER(ds, lengths)


@dataclasses.dataclass(frozen=True)
class LengthStats:
    """A split's inputs and targets (tokens, EOS included) against TASK_FEATURE_LENGTHS."""

    total: int
    truncated: int  # inputs longer than `max_tokens`
    max_tokens: int
    longest_inputs: int
    longest_targets: int

    def __str__(self) -> str:
        return f"{self.truncated} of {self.total} inputs truncated to {self.max_tokens} tokens"


def length_stats(
    task_or_mixture_name: str, split: str, feature_lengths: Mapping[str, int],
    max_examples: int | None = None,
) -> LengthStats:
    """Reads the split once (unshuffled): how many inputs `get_dataset` cuts, and the
    longest inputs and targets (what an eval without truncation needs).

    The pretraining tasks size their pieces to fit and count 0 of 0. For a mixture, the
    count is over the tasks that have the split. `max_examples` caps the examples read
    per task (large splits: the figures are then over their first examples).
    """
    max_tokens = check_lengths(feature_lengths)["inputs"]
    provider = seqio.get_mixture_or_task(task_or_mixture_name)
    names = [t.name for t in getattr(provider, "tasks", [provider]) if split in t.splits]
    truncated = total = longest_inputs = longest_targets = 0
    for name in names:
        if name in benchmarks.PRETRAINING_TASKS:
            continue
        ds = seqio.get_mixture_or_task(name).get_dataset(
            sequence_length=None, split=split, shuffle=False, num_epochs=1,
            trim_output_features=False,
        )  # fmt: skip
        if max_examples:
            ds = ds.take(max_examples)
        sizes = ds.map(lambda x: (tf.size(x["inputs"]), tf.size(x["targets"])))
        for n, m in sizes.as_numpy_iterator():
            total += 1
            truncated += int(n > max_tokens)
            longest_inputs, longest_targets = max(longest_inputs, n), max(longest_targets, m)
    return LengthStats(total, truncated, max_tokens, int(longest_inputs), int(longest_targets))
