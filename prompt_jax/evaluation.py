"""Evaluating a task split with the task's own metrics (seqio's Evaluator).

Predictions are greedy decodes with the KV cache; targets and postprocessing
are the task's, exactly as seqio computes them, so the train job's validation
metric, `prompt-jax eval` and the leaderboard-style metrics agree.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import build, decoding, losses
from prompt_jax.checkpoints.tree import PROMPT_PATH
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import T5

log = logging.getLogger(__name__)


def batches(ds, batch_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray], int]]:
    """(indices, features, n_real) from seqio's enumerated eval dataset; the last batch is
    padded with copies of its first row so that every batch has one static shape."""
    for index, features in ds.batch(batch_size).as_numpy_iterator():
        n = len(index)
        if n < batch_size:
            index = _pad_rows(index, batch_size)
            features = {k: _pad_rows(v, batch_size) for k, v in features.items()}
        yield index, features, n


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


class TaskEvaluator:
    """Evaluates one task or mixture split; build once, call `evaluate(params)` per eval."""

    def __init__(self, model: T5, mixture_or_task_name: str, split: str,
                 feature_lengths: dict[str, int], batch_size: int,
                 max_decode_length: int | None = None, num_examples: int | None = None,
                 shard_batch: Callable[[dict[str, np.ndarray]], Any] | None = None):
        import seqio

        from prompt_jax import data  # tf/seqio, and registers the tasks

        self.model = model
        self.batch_size = batch_size
        self.max_decode_length = max_decode_length or feature_lengths["targets"]
        self.shard_batch = shard_batch or (lambda b: {k: jnp.asarray(v) for k, v in b.items()})
        lengths = {"inputs": data.encoder_length(feature_lengths, model.prompt_length),
                   "targets": feature_lengths["targets"]}
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
        tasks = [t for t in getattr(provider, "tasks", [provider]) if split in t.splits]
        if not tasks:
            raise ValueError(f"{mixture_or_task_name}: no task has a {split!r} split")
        with_metrics = seqio.evaluation.get_valid_eval_tasks(tasks, split)
        self.evaluator = None
        if with_metrics:
            self.evaluator = seqio.Evaluator(
                mixture_or_task_name=mixture_or_task_name,
                feature_converter=seqio.EncDecFeatureConverter(pack=False),
                eval_split=split, sequence_length=lengths, num_examples=num_examples,
                use_memory_cache=True, async_compute_metrics=False)
        # The validation loss is measured on every task, metrics or not (e.g. the held-out
        # span-corruption loss of a pretraining run): the same examples every eval.
        self.loss_datasets = dict(self.evaluator.cached_model_datasets if self.evaluator
                                  else {})
        for task in tasks:
            if task.name not in self.loss_datasets:
                ds = data.get_dataset(task.name, split, feature_lengths, model.prompt_length,
                                      shuffle=False, seed=0, num_epochs=1)
                if num_examples:
                    ds = ds.take(num_examples)
                self.loss_datasets[task.name] = ds.cache().enumerate()
        self._score = None
        self._rank = None
        self.candidates = {t.name: c for t in tasks
                           if (c := _label_candidates(t, feature_lengths["targets"])) is not None}

    def predict_fn(self, params: Any) -> Callable:
        def predict(ds):
            out = []
            for index, features, n in batches(ds, self.batch_size):
                batch = self.shard_batch({"encoder_input_tokens":
                                          features["encoder_input_tokens"]})
                tokens, _ = decoding.greedy_decode(self.model, params,
                                                   batch["encoder_input_tokens"],
                                                   self.max_decode_length)
                tokens = np.asarray(jax.device_get(tokens))
                for i in range(n):
                    # Fixed length (seqio stacks them); vocab.decode stops at EOS.
                    out.append((int(index[i]), [int(t) for t in tokens[i]]))
            return out

        return predict

    def _log_likelihood_fn(self) -> Callable:
        if self._score is None:
            def score(p, b):
                logits = self.model.apply({"params": p}, b["encoder_input_tokens"],
                                          b["decoder_input_tokens"], b["decoder_target_tokens"])
                weights = (b["decoder_target_tokens"] > 0).astype(jnp.float32)
                return losses.per_example_log_likelihood(logits, b["decoder_target_tokens"],
                                                         weights)

            self._score = jax.jit(score)
        return self._score

    def score_fn(self, params: Any) -> Callable:
        score = self._log_likelihood_fn()

        def scores(ds):
            out = []
            for index, features, n in batches(ds, self.batch_size):
                s = np.asarray(jax.device_get(score(params, self.shard_batch(_teacher(features)))))
                out.extend((int(index[i]), float(s[i])) for i in range(n))
            return out

        return scores

    def rank_accuracy(self, params: Any) -> dict[str, float]:
        """Rank classification, per classification task: every label string scored by its
        log-likelihood in one batched pass, the argmax compared with the gold label."""
        from prompt_jax import serving

        if self._rank is None:
            self._rank = jax.jit(lambda p, enc, cand: serving.score_targets(self.model, p, enc,
                                                                            cand))
        out = {}
        for task, (candidates, labels) in self.candidates.items():
            ds = self.loss_datasets.get(task)
            gold = _gold_labels(self.evaluator, task, labels) if ds is not None else None
            if not gold:
                continue
            correct = total = 0
            for index, features, n in batches(ds, self.batch_size):
                enc = self.shard_batch({"e": features["encoder_input_tokens"]})["e"]
                scores = np.asarray(jax.device_get(self._rank(params, enc, candidates)))
                for i in range(n):
                    if int(index[i]) in gold:
                        correct += int(np.argmax(scores[i]) == gold[int(index[i])])
                        total += 1
            if total:
                out[task] = 100.0 * correct / total
        return out

    def token_loss(self, params: Any) -> dict[str, float]:
        """Teacher-forced cross-entropy per target token, per task: {task: loss}."""
        score = self._log_likelihood_fn()
        out = {}
        for task, ds in self.loss_datasets.items():
            total, tokens = 0.0, 0
            for _, features, n in batches(ds, self.batch_size):
                ll = np.asarray(jax.device_get(score(params, self.shard_batch(_teacher(features)))))
                total += float(ll[:n].sum())
                tokens += int((features["decoder_target_tokens"][:n] > 0).sum())
            out[task] = -total / max(tokens, 1)
        return out

    def evaluate(self, params: Any, step: int | None = None) -> dict[str, dict[str, float]]:
        """-> {task_name: {metric: value}}: the task's metrics and `loss`, the validation
        cross-entropy per target token."""
        results = {}
        if self.evaluator is not None:
            future, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                                predict_fn=self.predict_fn(params),
                                                score_fn=self.score_fn(params))
            results = {task: {k: _scalar(v) for k, v in metrics.items()}
                       for task, metrics in future.result().items()}
        for task, value in self.rank_accuracy(params).items():
            results.setdefault(task, {})["rank_accuracy"] = value
        for task, loss in self.token_loss(params).items():
            results.setdefault(task, {})["loss"] = loss
        return results


def _label_candidates(task: Any, length: int) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """The tokenized label strings of a classification task as targets [C, length], or None."""
    from prompt_jax import tasks
    from prompt_jax.tasks import benchmarks

    try:
        labels = tasks.class_labels(task.name)
    except ValueError:  # a task registered outside prompt_jax
        return None
    if not labels:
        return None
    vocab = task.output_features["targets"].vocabulary
    prefix = [vocab.vocab_size - 1] if task.name.endswith(benchmarks.SENTINEL_SUFFIX) else []
    rows = [prefix + list(vocab.encode(label)) + [decoding.EOS_ID] for label in labels]
    if max(map(len, rows)) > length:
        return None
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out, tuple(labels)


def _gold_labels(evaluator: Any, task: str, labels: tuple[str, ...]) -> dict[int, int]:
    """{example index: label index} from the cached task dataset's target strings."""
    from prompt_jax.tasks import benchmarks

    if evaluator is None or task not in evaluator.cached_task_datasets:
        return {}
    gold = {}
    for i, ex in enumerate(evaluator.cached_task_datasets[task].as_numpy_iterator()):
        text = ex.get("targets_pretokenized", b"")
        text = text.decode() if isinstance(text, bytes) else str(text)
        text = text.removeprefix("<extra_id_0>").strip() if task.endswith(
            benchmarks.SENTINEL_SUFFIX) else text
        if text in labels:
            gold[i] = labels.index(text)
    return gold


def _teacher(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")
    return {k: features[k] for k in keys}


def trim_at_eos(tokens: np.ndarray, eos_id: int = decoding.EOS_ID) -> list[int]:
    """Decoded ids up to (not including) the first EOS."""
    tokens = list(int(t) for t in tokens)
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else [t for t in tokens if t]


def _scalar(value: Any) -> float:
    """seqio metric values may be clu Metric objects or plain numbers."""
    if hasattr(value, "compute"):
        value = value.compute()
    if hasattr(value, "value"):  # seqio.metrics.Scalar
        value = value.value
    return float(np.asarray(value))


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {m: v}} -> {m: v} for one task, {'task/m': v} for a mixture."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    return {f"{task}/{m}": v for task, metrics in results.items() for m, v in metrics.items()}


@gin.configurable(denylist=[])
def evaluate(*, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: dict[str, int] = gin.REQUIRED,
             model: build.ModelSpec = build.ModelSpec(), initial_checkpoint: str | None = None,
             prompt_file: str | None = None, model_dir: str | None = None,
             split: str = "validation", batch_size: int = 32, eval_examples: int | None = None,
             mesh_shape: Sequence[int] = (-1, 1), seed: int = 0) -> dict[str, dict[str, float]]:
    """The eval job: a base checkpoint + a prompt file, one task split, its metrics.

    `prompt_file` defaults to MODEL_DIR/best_prompt.npy; a run that started from random
    weights keeps them in MODEL_DIR/base_model, which is used when `initial_checkpoint`
    is None. Prints the metrics and, with a MODEL_DIR, writes `eval_<split>.json` there.
    """
    from prompt_jax import data, partitioning, prompts

    data.check_name(mixture_or_task_name)
    if prompt_file is None and model_dir:
        candidate = os.path.join(model_dir, "best_prompt.npy")
        prompt_file = candidate if os.path.exists(candidate) else None
    mesh = partitioning.make_mesh(mesh_shape)
    config, frozen = build.load_frozen(model, initial_checkpoint, model_dir, seed)
    flat = dict(flatten(frozen))
    prompt_length = 0
    if prompt_file:
        prompt = prompts.load_prompt(prompt_file)
        if prompt.shape[1] != config.d_model:
            raise ValueError(f"{prompt_file}: prompt has shape {prompt.shape}, expected "
                             f"[P, {config.d_model}] (d_model of the frozen model)")
        flat[PROMPT_PATH] = prompt
        prompt_length = prompt.shape[0]
    t5 = T5(config, prompt_length=prompt_length)
    params = build.place_params(t5, unflatten(flat), mesh)
    evaluator = TaskEvaluator(t5, mixture_or_task_name, split, task_feature_lengths,
                              batch_size, num_examples=eval_examples,
                              shard_batch=lambda b: partitioning.replicated_batch(b, mesh))
    results = evaluator.evaluate(params)
    metrics = flat_metrics(results)
    print(f"{mixture_or_task_name} {split}"
          + (f" with {prompt_file}" if prompt_file else " (no prompt)") + ": "
          + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    if model_dir and jax.process_index() == 0:
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, f"eval_{split}.json"), "w") as f:
            json.dump({"prompt_file": prompt_file, "metrics": metrics}, f, indent=1)
    return results
