"""Verbalizers (PET, Schick & Schütze): per class one or more label words, scored by rank
classification on the frozen T5 (with any prompt method).

The rule, for multi-token and multi-word labels alike:

- a label word is a string ("yes", "not entailment", ...) and a candidate target: its
  SentencePiece ids then EOS (a `_sentinel` task's start with `<extra_id_0>`), trimmed to
  L - 1 tokens + EOS as seqio trims targets (`rank_classification`'s candidates);
- a word's score is its MEAN log-likelihood per target token (EOS and sentinel counted):
  `sum_l log p(y_l | y_<l, x) / n_tokens`, so long words are not penalised for length;
- a class's score is the MAX over its words' scores; the prediction is the class of
  highest score (ties: the lowest class index).

The PET loss is the cross-entropy over the classes' scores: `-log softmax(class
scores)[gold]`, averaged over the labelled rows (`pet_loss`). In training
(`LossConfig.pet_weight = w`) the step's objective is t5x's summed generation loss plus
w x the PET cross-entropy summed over the batch's labelled rows (`pet_sum`; a row's class is
the label its target spells); the step logs `pet_loss` (the mean). Eval reports
`verbalizer_accuracy` beside `rank_accuracy` for a task with a bound verbalizer.
Class-label initialisation (`PromptInit.kind='class_labels'`) with a bound verbalizer
takes its words, class by class (`init_labels`).

Binding (gin): `verbalizer_words.words = {'super_glue_rte': (('yes', 'true'), ('no',))}`, the
classes in the task's label order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class WordTargets:
    """Every label word as a candidate target: `tokens` [W, L] int32 (0-padded, each row
    ends in EOS), `word_class` [W] its class, `num_classes` C."""

    tokens: np.ndarray
    word_class: np.ndarray
    num_classes: int


def word_targets(words: Sequence[Sequence[Sequence[int]]], length: int) -> WordTargets:
    """Per class, its words' token ids (without EOS) -> WordTargets of `length` tokens
    (a word longer than length - 1 tokens keeps its first length - 1, then EOS)."""
    rows, owner = [], []
    for c, class_words in enumerate(words):
        if not class_words:
            raise ValueError(f"verbalizer: class {c} has no label words")
        for ids in class_words:
            rows.append(list(ids)[: length - 1] + [EOS_ID])
            owner.append(c)
    tokens = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return WordTargets(tokens, np.asarray(owner, np.int32), len(words))


def tokenize_words(words: Sequence[Sequence[str]], vocab: Any, length: int,
                   sentinel: bool = False) -> WordTargets:
    """Label word strings per class, tokenized as a task's targets (`sentinel`: prefixed
    with `<extra_id_0>`, as the `_sentinel` tasks' targets are)."""
    prefix = [vocab.vocab_size - 1] if sentinel else []
    return word_targets([[prefix + list(vocab.encode(w)) for w in ws] for ws in words], length)


def word_scores(model: Any, params: Any, encoder_input_tokens: Array, targets: WordTargets,
                prefix_embeddings: Array | None = None, prefix_mask: Array | None = None
                ) -> Array:
    """Mean log-likelihood per target token of every word -> [B, W]."""
    from prompt_jax import serving

    total = serving.score_targets(model, params, encoder_input_tokens, targets.tokens,
                                  prefix_embeddings, prefix_mask)
    return total / jnp.asarray((targets.tokens > 0).sum(-1), jnp.float32)


def class_scores(scores: Array, targets: WordTargets) -> Array:
    """Word scores [B, W] -> class scores [B, C]: the max over each class's words."""
    owner = jnp.asarray(targets.word_class)
    mine = owner[None, :] == jnp.arange(targets.num_classes)[:, None]  # [C, W]
    return jnp.max(jnp.where(mine[None], scores[:, None, :], -jnp.inf), axis=-1)


def classify(model: Any, params: Any, encoder_input_tokens: Array, targets: WordTargets,
             prefix_embeddings: Array | None = None, prefix_mask: Array | None = None
             ) -> tuple[Array, Array]:
    """-> (predicted class [B], class scores [B, C])."""
    scores = class_scores(word_scores(model, params, encoder_input_tokens, targets,
                                      prefix_embeddings, prefix_mask), targets)
    return jnp.argmax(scores, axis=-1), scores


def pet_loss(scores: Array, labels: Array) -> Array:
    """PET's loss: cross-entropy over the class scores [B, C] of the gold `labels` [B]
    (-1: unlabelled, not counted), averaged over the labelled rows."""
    logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
    valid = labels >= 0
    gold = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    return -jnp.sum(jnp.where(valid, gold, 0.0)) / jnp.maximum(valid.sum(), 1)


@dataclasses.dataclass(frozen=True)
class PetTargets:
    """What the PET loss of a task needs in the train step: its label words (`words`) and
    its classes' own targets (`label_tokens` [C, L], `rank_classification.candidates`),
    by which a batch row's target tells its class (a row whose target is none of them is
    unlabelled and not counted)."""

    words: WordTargets
    label_tokens: np.ndarray


def task_word_targets(task_name: str, length: int) -> WordTargets | None:
    """The bound verbalizer of a registered task tokenized as its targets of `length`
    tokens; None without one."""
    import seqio

    from prompt_jax import tasks

    words = words_for(task_name)
    if words is None:
        return None
    vocab = seqio.get_mixture_or_task(task_name).output_features["targets"].vocabulary
    return tokenize_words(words, vocab, length, task_name.endswith(tasks.SENTINEL_SUFFIX))


def pet_targets(task_name: str, length: int) -> PetTargets:
    """The bound verbalizer of `task_name` and its label targets at target `length`; a
    clear error when the task has no verbalizer or no rankable labels."""
    from prompt_jax import rank_classification

    words = task_word_targets(task_name, length)
    if words is None:
        raise ValueError(f"LossConfig.pet_weight > 0: {task_name} has no verbalizer; bind "
                         f"verbalizer_words.words = {{'{task_name}': (('word', ...), ...)}}")
    labels = rank_classification.candidates(task_name, length)
    if labels is None:
        raise ValueError(f"LossConfig.pet_weight > 0: {task_name} has no class labels to "
                         f"rank at target length {length}")
    return PetTargets(words, labels.tokens)


def batch_labels(target_tokens: Array, label_tokens: np.ndarray) -> Array:
    """Each row's class: the index of the label target its `target_tokens` [B, L] equal
    ([C, L'] 0-padded, compared over min(L, L')), -1 where none does."""
    length = min(target_tokens.shape[1], label_tokens.shape[1])
    same = jnp.all(target_tokens[:, None, :length] == jnp.asarray(label_tokens)[None, :, :length],
                   axis=-1)  # [B, C]
    return jnp.where(same.any(-1), jnp.argmax(same, -1), -1)


def pet_sum(model: Any, params: Any, batch: Mapping[str, Array], pet: PetTargets
            ) -> tuple[Array, Array]:
    """(Σ over the labelled rows of PET's cross-entropy, how many rows are labelled): the
    term the train step adds to its summed objective, `pet_weight` x this sum (a sum over
    rows, like t5x's sum over tokens, so microbatches add up to the whole batch). The words
    are scored as at inference: no dropout."""
    labels = batch_labels(batch["decoder_target_tokens"], pet.label_tokens)
    scores = class_scores(word_scores(model, params, batch["encoder_input_tokens"], pet.words),
                          pet.words)
    rows = (labels >= 0).sum()
    return pet_loss(scores, labels) * rows, rows.astype(jnp.float32)


# ------------------------------------------------------------------------ the binding


@gin.configurable
def verbalizer_words(words: Mapping[str, Sequence[Sequence[str]]] | None = None
                     ) -> dict[str, tuple[tuple[str, ...], ...]]:
    """The gin-bound label words, {task: per class (in label order) its words}."""
    out = {}
    for task, classes in (words or {}).items():
        if isinstance(classes, str) or not all(
                not isinstance(ws, str) and ws and all(isinstance(w, str) and w for w in ws)
                for ws in classes):
            raise ValueError(f"verbalizer_words.words[{task!r}]: expected per class a tuple of "
                             f"non-empty word strings, found {classes!r}")
        out[task] = tuple(tuple(ws) for ws in classes)
    return out


def words_for(task_name: str) -> tuple[tuple[str, ...], ...] | None:
    """The bound verbalizer of a task (exact name, else its base task's), checked against
    the task's class count; None without one."""
    from prompt_jax import tasks

    bound = verbalizer_words()
    base = task_name.removeprefix(tasks.TASKLESS_PREFIX).removesuffix(tasks.SENTINEL_SUFFIX)
    words = bound.get(task_name, bound.get(base))
    if words is None:
        return None
    labels = tasks.class_labels(task_name)
    if not labels or len(labels) != len(words):
        raise ValueError(f"verbalizer_words.words[{task_name!r}]: {len(words)} classes, but "
                         f"the task has {len(labels or ())} ({', '.join(labels or ())})")
    return words


def init_labels(task_name: str) -> tuple[str, ...] | None:
    """The strings class-label initialisation embeds: the verbalizer's words class by class
    (first words of every class first, then second words, ...), else the task's labels."""
    from prompt_jax import tasks

    words = words_for(task_name)
    if words is None:
        return tasks.class_labels(task_name)
    depth = max(map(len, words))
    return tuple(ws[i] for i in range(depth) for ws in words if i < len(ws))
