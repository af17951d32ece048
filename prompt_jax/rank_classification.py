"""Rank classification of a classification task: its label strings as candidate targets,
and each example's gold label.

A candidate is tokenized exactly as the task tokenizes its targets: the label's
SentencePiece ids, then EOS; a `_sentinel` task's targets start with `<extra_id_0>`
(`tasks.formats.prepend_sentinel`). Long labels follow seqio's rule for targets: a
candidate longer than the target length L keeps its first L - 1 tokens and ends in EOS,
so each candidate is the very target the model is trained and teacher-forced on. If
that trimming leaves two labels with the same tokens, the task cannot be ranked at that
length and `candidates` returns None (with a warning naming the labels).

The prediction for an example is the candidate of highest total log-likelihood
(`serving.rank_classify`); the gold label is the index of the example's target string
among the labels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class Candidates:
    """`tokens` [C, L] int32 (0-padded, each row ends in EOS) for `labels[c]`."""

    tokens: np.ndarray
    labels: tuple[str, ...]


def candidates(task_name: str, length: int) -> Candidates | None:
    """The label strings of `task_name` as targets of `length` tokens, or None for a task
    without fixed labels (or whose labels trimming makes identical, see the module doc)."""
    import seqio

    from prompt_jax import tasks

    labels = tasks.class_labels(task_name)
    if not labels:
        return None
    vocab = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    prefix = [vocab.vocab_size - 1] if task_name.endswith(tasks.SENTINEL_SUFFIX) else []
    rows = [(prefix + list(vocab.encode(label)))[: length - 1] + [EOS_ID] for label in labels]
    seen: dict[tuple[int, ...], str] = {}
    for label, row in zip(labels, rows, strict=True):
        if tuple(row) in seen:
            log.warning("%s: labels %r and %r are the same %d target tokens; no rank "
                        "classification at this target length", task_name, seen[tuple(row)],
                        label, length)
            return None
        seen[tuple(row)] = label
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return Candidates(tokens, tuple(labels))


def gold_label(target: Any, labels: tuple[str, ...]) -> int | None:
    """The index of an example's target string (`targets_pretokenized`) among `labels`,
    or None (an unlabelled or free-text example)."""
    from prompt_jax.tasks.postprocessors import SENTINEL

    text = target.decode() if isinstance(target, bytes) else str(target)
    text = text.removeprefix(SENTINEL).strip()
    return labels.index(text) if text in labels else None


def gold_labels(examples: Iterable[Mapping[str, Any]], labels: tuple[str, ...]
                ) -> dict[int, int]:
    """{example index: label index} over a task's (preprocessed, unshuffled) examples."""
    out = {}
    for i, ex in enumerate(examples):
        label = gold_label(ex.get("targets_pretokenized", b""), labels)
        if label is not None:
            out[i] = label
    return out
