"""Multi-task prompts: a prompt shared by every task of a mixture plus a prompt per task.

Task t's prompt (its *combined* prompt, `[P_t', E]`) is built from the shared prompt
`[P_s, E]` and the task's own `[P_t, E]` (modes as the reference's
`prompt_tuning/extended/multitask_prompts.py`):

  concat  [shared; task_t]   the shared rows first, then the task's: P_t' = P_s + P_t;
          per-task lengths may differ, and either part may be empty (P_s = 0: per-task
          prompts only; P_t = 0: the task uses the shared prompt alone)
  add     shared + task_t    element-wise: every P_t equals P_s = P_t'

Training runs on a seqio mixture with a task index per example (`get_dataset` adds
`task_index` [B] int32: the task's position in `MultitaskT5.task_names`, the mixture's
task names sorted), so one batch mixes tasks. The N combined prompts are LEFT-padded to
the longest, P = max P_t' (`pack`), with a prefix mask False on the padding; row b gets
prompt `task_index[b]` (`serving.mixed_batch_prefix`): T5 depends only on relative
positions and masked keys get zero weight, so each row computes what it computes alone
with its combined prompt prepended (`T5(config, prompt_length=P_t')`).

Parameters: `multitask_prompt/shared/prompt` [P_s, E] and `multitask_prompt/<task>/prompt`
[P_t, E] (absent where a length is 0); the default TRAINABLE `.*prompt.*` selects them.
What a run saves is the combined prompt per task, a plain `[P_t', E]` prompt file
(MODEL_DIR/task_prompts/<task>/<step>.npy and best_prompt.npy, `model_dir.task_prompt_at`),
which eval, infer and serve load as any prompt. PEFT's multitask prompt tuning (MPT) is a
different combination (the shared prompt times a per-task rank-r matrix); it is not
offered here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import prompts, serving
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.config import PROMPT_PATH
from prompt_jax.t5.model import T5

Array = jax.Array
MODES = ("add", "concat")
SCOPE = "multitask_prompt"  # the parameters' top-level name
TASK_INDEX = "task_index"  # the batch feature [B] int32
MEAN = "mean"  # the eval's mean over tasks: metrics `mean/<metric>`


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MultitaskPrompts:
    """The multi-task prompt method (gin: `methods/multitask.gin`).

    `shared_length` P_s; `task_length` the per-task P_t of every task of the mixture
    (None: P_s), `task_lengths` {task: P_t} for the tasks that differ; `mode` add | concat.
    """

    shared_length: int = 16
    task_length: int | None = None
    task_lengths: Mapping[str, int] = dataclasses.field(default_factory=dict)
    mode: str = "concat"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"MultitaskPrompts.mode={self.mode!r} is not one of "
                             f"{', '.join(MODES)}")
        for name, value in (("shared_length", self.shared_length),
                            ("task_length", self.task_length),
                            *((f"task_lengths[{k!r}]", v) for k, v in self.task_lengths.items())):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 0):
                raise ValueError(f"MultitaskPrompts.{name} must be a non-negative integer, "
                                 f"got {value!r}")

    def lengths(self, task_names: Sequence[str]) -> tuple[int, ...]:
        """P_t per task of `task_names`, checked against the mode."""
        unknown = sorted(set(self.task_lengths) - set(task_names))
        if unknown:
            raise ValueError(f"MultitaskPrompts.task_lengths names {unknown[0]!r}, which is not "
                             f"a task of the mixture ({', '.join(task_names)})")
        default = self.shared_length if self.task_length is None else self.task_length
        lengths = tuple(self.task_lengths.get(t, default) for t in task_names)
        for task, n in zip(task_names, lengths, strict=True):
            if self.mode == "add" and n != self.shared_length:
                raise ValueError(f"MultitaskPrompts: mode='add' needs every task prompt as long "
                                 f"as the shared prompt ({self.shared_length}); {task} has {n}")
            if self.shared_length + n == 0:
                raise ValueError(f"MultitaskPrompts: {task} has no prompt (shared_length=0 and "
                                 "task length 0)")
        return lengths

    def model(self, config: Any, mixture_name: str) -> MultitaskT5:
        """The model for `mixture_name`'s tasks (sorted by name)."""
        names = mixture_tasks(mixture_name)
        return MultitaskT5(config, task_names=names, shared_length=self.shared_length,
                           task_lengths=self.lengths(names), mode=self.mode)


def mixture_tasks(mixture_name: str) -> tuple[str, ...]:
    """The task names of a registered seqio mixture, sorted (the task index order)."""
    import seqio

    from prompt_jax import data  # noqa: F401 (registers the tasks)

    provider = seqio.get_mixture_or_task(mixture_name)
    if not isinstance(provider, seqio.Mixture):
        raise ValueError(f"MIXTURE_OR_TASK_NAME={mixture_name!r} is a task; multi-task prompts "
                         "train on a seqio mixture of tasks")
    return tuple(sorted(t.name for t in provider.tasks))


def combine(shared: Array | None, task: Array | None, mode: str) -> Array:
    """shared [P_s, E] (None: P_s = 0) and task [P_t, E] (None: P_t = 0) -> [P_t', E]."""
    if mode == "add":
        return shared + task
    parts = [p for p in (shared, task) if p is not None]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)


def pack(combined: Sequence[Array]) -> tuple[Array, Array]:
    """Prompts [P_i, E] -> (left-padded [N, P, E], mask [N, P]), P = max P_i; traceable
    (`serving.pack_prompts` on host arrays gives the same)."""
    longest = max(p.shape[0] for p in combined)
    padded = jnp.stack([jnp.pad(p, ((longest - p.shape[0], 0), (0, 0))) for p in combined])
    mask = jnp.asarray(np.stack([np.arange(longest) >= longest - p.shape[0] for p in combined]))
    return padded, mask


class MultitaskPrompt(nn.Module):
    """The shared and per-task prompts -> every task's combined prompt, packed."""

    task_names: tuple[str, ...]
    shared_length: int
    task_lengths: tuple[int, ...]
    mode: str
    embed_dim: int

    @nn.compact
    def __call__(self) -> tuple[Array, Array]:
        """-> (combined prompts left-padded [N, P, E], mask [N, P])."""
        shared = (prompts.Prompt(self.shared_length, self.embed_dim, name="shared")()
                  if self.shared_length else None)
        combined = []
        for name, length in zip(self.task_names, self.task_lengths, strict=True):
            task = prompts.Prompt(length, self.embed_dim, name=name)() if length else None
            combined.append(combine(shared, task, self.mode))
        return pack(combined)


class MultitaskT5(T5):
    """T5 with multi-task prompts: `__call__` takes `task_index` [B] (None: task 0) and
    prepends each row's combined prompt. Built with `prompt_length=0` (the prompts are
    these); `T5.encode` / `T5.decode` are T5's, without a prompt of their own."""

    task_names: tuple[str, ...] = ()
    shared_length: int = 0
    task_lengths: tuple[int, ...] = ()
    mode: str = "concat"

    def setup(self):
        if self.prompt_length:
            raise ValueError("MultitaskT5 takes its prompts from MultitaskPrompts; "
                             "train.prompt_length must be 0")
        super().setup()
        self.multitask_prompt = MultitaskPrompt(self.task_names, self.shared_length,
                                                self.task_lengths, self.mode,
                                                self.config.d_model, name=SCOPE)

    def task_prefix(self, task_index: Array) -> tuple[Array, Array]:
        """task_index [B] -> (prefix_embeddings [B, P, E], prefix_mask [B, P])."""
        packed, mask = self.multitask_prompt()
        return serving.mixed_batch_prefix(packed, mask, task_index)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None, enable_dropout: bool = False,
                 prefix_embeddings: Array | None = None, prefix_mask: Array | None = None,
                 task_index: Array | None = None) -> Array:
        """Teacher-forced logits [B, L, V], row b with task `task_index[b]`'s prompt."""
        if prefix_embeddings is not None:
            raise ValueError("MultitaskT5 prepends its own prompts; pass task_index, not "
                             "prefix_embeddings")
        if task_index is None:
            task_index = jnp.zeros(encoder_input_tokens.shape[:1], jnp.int32)
        prefix, mask = self.task_prefix(task_index)
        return super().__call__(encoder_input_tokens, decoder_input_tokens,
                                decoder_target_tokens, enable_dropout, prefix, mask)


# ----------------------------------------------------------------- the combined prompts


def combined_lengths(model: MultitaskT5) -> tuple[int, ...]:
    """Each task's combined prompt length (concat: P_s + P_t; add: P_s)."""
    return tuple(model.shared_length + n if model.mode == "concat" else model.shared_length
                 for n in model.task_lengths)


def combined_prompts(params: Any, model: MultitaskT5) -> dict[str, Array]:
    """{task: combined prompt [P_t', E]} from a tree holding the multitask parameters
    (the whole tree or the trainable part)."""
    flat = flatten(params)

    def part(name, length):
        return flat[f"{SCOPE}/{name}/prompt"] if length else None

    shared = part("shared", model.shared_length)
    return {name: combine(shared, part(name, length), model.mode)
            for name, length in zip(model.task_names, model.task_lengths, strict=True)}


def single_task_params(params: Any, prompt: Array) -> dict[str, Any]:
    """The tree of `T5(config, prompt_length=P)` running `prompt` [P, E]: `params` without
    the multitask parameters, with `prompt` as the model's own (nothing copied)."""
    flat = {k: v for k, v in flatten(params).items() if not k.startswith(f"{SCOPE}/")}
    return unflatten({**flat, PROMPT_PATH: prompt})


def save_task_prompts(trainable: Any, model: MultitaskT5, path_of) -> None:
    """Write each task's combined prompt to `path_of(task)` (float32 `.npy`)."""
    combined = jax.device_get(combined_prompts(trainable, model))
    for task, prompt in combined.items():
        prompts.save_prompt(path_of(task), np.asarray(prompt))


def initial_params(model: MultitaskT5, make_initializer, rng: Array) -> dict[str, np.ndarray]:
    """{path: host array} of the multitask parameters.

    `make_initializer(labels)` -> an initializer for a prompt whose class labels are
    `labels` (a task's labels; for the shared prompt, every task's, first seen first; None
    where no task has any). In add mode the task prompts start at zero, so every combined
    prompt starts as the shared one; in concat mode each task prompt is initialized as its
    task's.
    """
    from prompt_jax import tasks

    labels = {t: tasks.class_labels(t) for t in model.task_names}
    every = tuple(dict.fromkeys(x for t in model.task_names for x in labels[t] or ()))
    out = {}
    d_model = model.config.d_model
    if model.shared_length:
        init = make_initializer(every or None)
        out[f"{SCOPE}/shared/prompt"] = np.asarray(
            init(jax.random.fold_in(rng, 0), (model.shared_length, d_model)))
    for i, (task, length) in enumerate(zip(model.task_names, model.task_lengths, strict=True)):
        if not length:
            continue
        if model.mode == "add":
            value = np.zeros((length, d_model), np.float32)
        else:
            value = np.asarray(make_initializer(labels[task])(jax.random.fold_in(rng, i + 1),
                                                              (length, d_model)))
        out[f"{SCOPE}/{task}/prompt"] = value
    return out


def default_prompt_files(model_dir: str | None, mixture_or_task_name: str | None
                         ) -> dict[str, str]:
    """{task: MODEL_DIR/task_prompts/<task>/best_prompt.npy} for the tasks of a task or
    mixture name that a multi-task run in `model_dir` saved; {} for any other MODEL_DIR."""
    import os

    import seqio

    from prompt_jax import data  # noqa: F401 (registers the tasks)
    from prompt_jax import model_dir as model_dir_lib

    if not model_dir or not mixture_or_task_name or not os.path.isdir(
            model_dir_lib.path(model_dir, model_dir_lib.TASK_PROMPTS)):
        return {}
    provider = seqio.get_mixture_or_task(mixture_or_task_name)
    names = [t.name for t in getattr(provider, "tasks", [provider])]
    found = {n: model_dir_lib.task_prompt_at(model_dir, n) for n in sorted(names)}
    return {n: p for n, p in found.items() if os.path.exists(p)}


# ----------------------------------------------------------------- data and eval


def get_dataset(mixture_name: str, split: str, feature_lengths: Mapping[str, int], *,
                task_names: Sequence[str], shuffle: bool, seed: int | None,
                num_epochs: int | None, shard_info: Any = None):
    """The mixture's model features (as `data.get_dataset`) plus `task_index` (int32, the
    task's position in `task_names`), sampled at the mixture's rates as seqio samples a
    mixture (the same seed gives the same sequence)."""
    import seqio
    import tensorflow as tf

    from prompt_jax import data

    mixture = seqio.get_mixture_or_task(mixture_name)
    datasets, rates = [], []
    for index, name in enumerate(task_names):
        ds = data.get_dataset(name, split, feature_lengths, shuffle=shuffle, seed=seed,
                              num_epochs=num_epochs, shard_info=shard_info)
        datasets.append(ds.map(lambda x, i=index: {**x, TASK_INDEX: tf.constant(i, tf.int32)}))
        rates.append(float(mixture.get_rate(seqio.get_mixture_or_task(name))))
    sample_seed = seed if seed is not None else (None if shuffle else 42)
    return tf.data.Dataset.sample_from_datasets(datasets, rates, seed=sample_seed,
                                                stop_on_empty_dataset=True)


class MultitaskEvaluator:
    """Each task of the mixture evaluated with its combined prompt, as a plain
    `T5(config, prompt_length=P_t')` runs it (what eval and infer run from the saved file).
    `evaluate(params, step)` -> {task: metrics}, as `TaskEvaluator` gives for a mixture, and
    their mean over tasks (the early-stopping metric `mean/loss`, `mean/accuracy`, ...)."""

    def __init__(self, model: MultitaskT5, split: str, feature_lengths: dict[str, int],
                 batch_size: int, *, mesh: Any = None, num_examples: int | None = None,
                 truncate_inputs: bool = False):
        from prompt_jax.evaluation import TaskEvaluator

        self.model = model
        self.evaluators = {}
        for name, length in zip(model.task_names, model.task_lengths, strict=True):
            combined_length = length if model.mode == "add" else model.shared_length + length
            self.evaluators[name] = TaskEvaluator(
                T5(model.config, prompt_length=combined_length), name, split, feature_lengths,
                batch_size, mesh=mesh, num_examples=num_examples,
                truncate_inputs=truncate_inputs)
        self._combined = jax.jit(lambda p: combined_prompts(p, model))

    def loss_names(self) -> list[str]:
        """The flat names of the losses `evaluate` reports: `mean/loss`, `<task>/loss`."""
        from prompt_jax.evaluation import flat_metrics

        return list(flat_metrics({name: {"loss": 0.0} for name in (MEAN, *self.evaluators)}))

    def evaluate(self, params: Any, step: int | None = None) -> dict[str, dict[str, float]]:
        """-> {MEAN: {metric: mean over the tasks that have it, for those all have}, task:
        metrics, ...}; flat (`evaluation.flat_metrics`) `mean/loss`, `<task>/loss`, ..."""
        combined = self._combined({SCOPE: params[SCOPE]})
        results = {}
        for name, evaluator in self.evaluators.items():
            results.update(evaluator.evaluate(single_task_params(params, combined[name]), step))
        shared = set.intersection(*(set(m) for m in results.values()))
        first = next(iter(results.values()))
        mean = {k: float(np.mean([m[k] for m in results.values()])) for k in first if k in shared}
        return {MEAN: mean, **results}
