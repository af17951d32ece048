"""Evaluating a task split with the task's own metrics (seqio's Evaluator), and the eval job.

Predictions are greedy decodes with the KV cache; targets and postprocessing
are the task's, exactly as seqio computes them, so the train job's validation
metric, `prompt-jax eval` and the leaderboard-style metrics agree. Besides the
task's metrics: `rank_accuracy` (rank classification over the label strings,
`rank_classification`), `verbalizer_accuracy` where a verbalizer is bound
(methods/verbalizers.py) and `loss` (cross-entropy per target token). A model with P-tuning
v2's classification head reports the head's `head_accuracy` and `loss` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax import build, decoding, losses, partitioning, rank_classification
from prompt_jax import model_dir as model_dir_lib
from prompt_jax.methods import multitask, verbalizers
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import PROMPT_PATH, T5


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
    """Evaluates one task or mixture split; build once, call `evaluate(params)` per eval.

    `params` is the whole tree as the model names it, placed as the rules say
    (`build.place_params`; in training `optim.merge_params(state.trainable, frozen)`, which
    copies nothing). Batches go on `mesh` with their rows on the `data` axis: each device
    decodes and scores only its rows. Inputs are evaluated whole unless
    `truncate_inputs` (the reference's infer-eval computes the length a split needs;
    `TASK_FEATURE_LENGTHS['inputs']` is the training budget).
    """

    def __init__(self, model: T5, mixture_or_task_name: str, split: str,
                 feature_lengths: dict[str, int], batch_size: int, *, mesh: Any = None,
                 num_examples: int | None = None, truncate_inputs: bool = False):
        import seqio

        from prompt_jax import data  # tf/seqio, and registers the tasks

        self.model = model
        self.batch_size = batch_size
        self.mesh = mesh
        if mesh is not None:
            partitioning.check_batch_size(batch_size, mesh.shape["data"], "eval batch size")
        lengths = data.check_lengths(feature_lengths)
        self.stats = data.length_stats(mixture_or_task_name, split, lengths, num_examples)
        if not truncate_inputs and self.stats.total:  # pretraining tasks size their own
            lengths["inputs"] = self.stats.longest_inputs
        self.lengths = lengths
        provider = seqio.get_mixture_or_task(mixture_or_task_name)
        tasks = [t for t in getattr(provider, "tasks", [provider]) if split in t.splits]
        if not tasks:
            raise ValueError(f"{mixture_or_task_name}: no task has a {split!r} split")
        self.evaluator = None
        # P-tuning v2's classification head (methods/deep_prompts.py): the head's own
        # accuracy and loss; the decoder, untouched by it, is not scored.
        spec = getattr(model, "deep_prompt_spec", None)
        self.head = bool(spec is not None and spec.classification_head)
        if not self.head and seqio.evaluation.get_valid_eval_tasks(tasks, split):
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
                ds = data.get_dataset(task.name, split, lengths, shuffle=False, seed=0,
                                      num_epochs=1)
                if num_examples:
                    ds = ds.take(num_examples)
                self.loss_datasets[task.name] = ds.cache().enumerate()
        self.ranked = {}  # task -> (candidate targets [C, L], {example index: gold label})
        self.verbalized = {}  # task -> its bound verbalizer's words (methods/verbalizers.py)
        cached = self.evaluator.cached_task_datasets if self.evaluator else {}
        for task in tasks:
            found = rank_classification.candidates(task.name, lengths["targets"])
            if found is not None and task.name in cached:
                gold = rank_classification.gold_labels(cached[task.name].as_numpy_iterator(),
                                                       found.labels)
                if gold:
                    self.ranked[task.name] = (found.tokens, gold)
                    words = verbalizers.task_word_targets(task.name, lengths["targets"])
                    if words is not None:
                        self.verbalized[task.name] = words
        self.head_labels = {}  # task -> its label targets [C, L], by which a row's class is told
        if self.head:
            for task in tasks:
                found = rank_classification.candidates(task.name, lengths["targets"])
                if found is not None:
                    self.head_labels[task.name] = found.tokens
        self._log_likelihood = jax.jit(self._log_likelihood_of)
        self._classify = jax.jit(lambda params, tokens: self.model.apply(
            {"params": params}, tokens, method=self.model.classify))

    def _place(self, tokens: np.ndarray) -> Any:
        if self.mesh is None:
            return jnp.asarray(tokens)
        return partitioning.whole_batch({"x": tokens}, self.mesh)["x"]

    def _log_likelihood_of(self, params: Any, batch: dict[str, Any]) -> Any:
        logits = self.model.apply({"params": params}, batch["encoder_input_tokens"],
                                  batch["decoder_input_tokens"], batch["decoder_target_tokens"])
        return losses.per_example_log_likelihood(logits, batch["decoder_target_tokens"],
                                                 losses.loss_weights(batch))

    def predict_fn(self, params: Any) -> Callable:
        def predict(ds):
            out = []
            for index, features, n in batches(ds, self.batch_size):
                decoded, _ = decoding.greedy_decode(
                    self.model, params, self._place(features["encoder_input_tokens"]),
                    self.lengths["targets"])
                decoded = np.asarray(jax.device_get(decoded))
                # Fixed length (seqio stacks them); vocab.decode stops at EOS.
                out.extend((int(index[i]), [int(t) for t in decoded[i]]) for i in range(n))
            return out

        return predict

    def rank_accuracy(self, params: Any) -> dict[str, dict[str, float]]:
        """Rank classification, per classification task: every label string scored by its
        log-likelihood in one batched pass, the argmax compared with the gold label
        (`rank_accuracy`); with a bound verbalizer also its words' classes
        (`verbalizer_accuracy`: mean log-likelihood per token, max over a class's words)."""
        from prompt_jax import serving

        out = {}
        for task, (candidates, gold) in self.ranked.items():
            words = self.verbalized.get(task)
            correct, total = {"rank_accuracy": 0, "verbalizer_accuracy": 0}, 0
            for index, features, n in batches(self.loss_datasets[task], self.batch_size):
                tokens = self._place(features["encoder_input_tokens"])
                chosen = {"rank_accuracy": np.argmax(np.asarray(jax.device_get(
                    serving.score_targets(self.model, params, tokens, candidates))), -1)}
                if words is not None:
                    chosen["verbalizer_accuracy"] = np.asarray(jax.device_get(
                        verbalizers.classify(self.model, params, tokens, words)[0]))
                for i in range(n):
                    if int(index[i]) in gold:
                        for name, choice in chosen.items():
                            correct[name] += int(choice[i] == gold[int(index[i])])
                        total += 1
            if total:
                out[task] = {name: 100.0 * correct[name] / total for name in
                             (["rank_accuracy"] + (["verbalizer_accuracy"] if words else []))}
        return out

    def token_loss(self, params: Any) -> dict[str, float]:
        """Teacher-forced cross-entropy per target token, per task: {task: loss}."""
        out = {}
        for task, ds in self.loss_datasets.items():
            total, tokens = 0.0, 0
            for _, features, n in batches(ds, self.batch_size):
                batch = {k: self._place(features[k]) for k in _TEACHER_FORCED}
                ll = np.asarray(jax.device_get(self._log_likelihood(params, batch)))
                total += float(ll[:n].sum())
                tokens += int((features["decoder_target_tokens"][:n] > 0).sum())
            out[task] = -total / max(tokens, 1)
        return out

    def head_metrics(self, params: Any) -> dict[str, dict[str, float]]:
        """A classification head's `head_accuracy` (%) and `loss` (its cross-entropy per
        labelled example: what early stopping compares) per task; rows whose target is
        none of the labels do not count."""
        out = {}
        for task, label_tokens in self.head_labels.items():
            correct, total, nll = 0, 0, 0.0
            for _, features, n in batches(self.loss_datasets[task], self.batch_size):
                logits = np.asarray(jax.device_get(self._classify(
                    params, self._place(features["encoder_input_tokens"]))), np.float64)[:n]
                labels = np.asarray(verbalizers.batch_labels(
                    jnp.asarray(features["decoder_target_tokens"][:n]), label_tokens))
                keep = labels >= 0
                logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
                nll -= float(logp[keep, labels[keep]].sum())
                correct += int((logits.argmax(-1)[keep] == labels[keep]).sum())
                total += int(keep.sum())
            if total:
                out[task] = {"head_accuracy": 100.0 * correct / total, "loss": nll / total}
        return out

    def loss_names(self) -> list[str]:
        """The flat names of the losses `evaluate` reports: `loss`, or `<task>/loss` each."""
        tasks = self.head_labels if self.head else self.loss_datasets
        return list(flat_metrics({task: {"loss": 0.0} for task in tasks}))

    def evaluate(self, params: Any, step: int | None = None) -> dict[str, dict[str, float]]:
        """-> {task_name: {metric: value}}: the task's metrics, `rank_accuracy` for
        classification tasks, and `loss`, the validation cross-entropy per target token;
        with a classification head, `head_metrics` alone."""
        if self.head:
            return self.head_metrics(params)
        results = {}
        if self.evaluator is not None:
            future, _ = self.evaluator.evaluate(compute_metrics=True, step=step,
                                                predict_fn=self.predict_fn(params))
            results = {task: {k: _scalar(v) for k, v in metrics.items()}
                       for task, metrics in future.result().items()}
        for task, values in self.rank_accuracy(params).items():
            results.setdefault(task, {}).update(values)
        for task, loss in self.token_loss(params).items():
            results.setdefault(task, {})["loss"] = loss
        return results


_TEACHER_FORCED = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens")


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


def is_loss(name: str) -> bool:
    """Whether a (flat) metric name is a loss, where lower is better."""
    return name == "loss" or name.endswith("/loss")


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {m: v}} -> {m: v} for one task, {'task/m': v} for a mixture."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    return {f"{task}/{m}": v for task, metrics in results.items() for m, v in metrics.items()}


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())


@gin.configurable(denylist=[])
def evaluate(*, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: dict[str, int] = gin.REQUIRED,
             model: build.ModelSpec = build.ModelSpec(), initial_checkpoint: str | None = None,
             prompt_file: str | None = None, model_dir: str | None = None,
             split: str = "validation", batch_size: int = 32, eval_examples: int | None = None,
             truncate_inputs: bool = False, mesh_shape: Sequence[int] = (-1, 1),
             seed: int = 0) -> dict[str, dict[str, float]]:
    """The eval job: a frozen model + a prompt, one task split, its metrics.

    The model and the prompt come from `build.load_served` (`prompt_file`, by default
    MODEL_DIR/best_prompt.npy; a run that started from random weights keeps them in
    MODEL_DIR/base_model). Prints the metrics and, with a MODEL_DIR, writes
    `eval_<split>.json` there.
    """
    from prompt_jax import data

    data.check_name(mixture_or_task_name)
    mesh = partitioning.make_mesh(mesh_shape)
    if not prompt_file and (by_task := multitask.default_prompt_files(model_dir,
                                                                      mixture_or_task_name)):
        if len(by_task) > 1:  # a multi-task run: one prompt per task
            raise ValueError(f"{model_dir} holds one prompt per task ({', '.join(by_task)}); "
                             "evaluate one task: MIXTURE_OR_TASK_NAME=<one of them>")
        prompt_file = next(iter(by_task.values()))
    served = build.load_served(model, initial_checkpoint, model_dir,
                               [prompt_file] if prompt_file else None, seed)
    flat = served.with_deep_prompt(dict(flatten(served.frozen)))
    prompt_length = 0
    for name, prompt in served.prompts.items():  # at most one
        flat[PROMPT_PATH] = prompt
        prompt_length, prompt_file = prompt.shape[0], served.sources[name]
    prompt_file = ", ".join(filter(None, [prompt_file, served.deep_prompt_source])) or None
    served.head_task(mixture_or_task_name)  # a head's class count is the task's
    from prompt_jax.methods import templates

    # With a template's soft tokens the prompt's rows go there (methods/templates.py).
    templates.check_prompt_length(mixture_or_task_name, prompt_length, prompt_file or "the model")
    model = served.model(prompt_length).clone(
        soft_token_id=templates.model_soft_token_id(mixture_or_task_name))
    params = build.place_params(served.config, unflatten(flat), mesh, model=model)
    evaluator = TaskEvaluator(model,
                              mixture_or_task_name, split, task_feature_lengths, batch_size,
                              mesh=mesh, num_examples=eval_examples,
                              truncate_inputs=truncate_inputs)
    results = evaluator.evaluate(params)
    metrics = flat_metrics(results)
    print(f"{mixture_or_task_name} {split}"
          + (f" with {prompt_file}" if prompt_file else " (no prompt)") + ": "
          + format_metrics(metrics), flush=True)
    if model_dir and jax.process_index() == 0:
        model_dir_lib.write_json(model_dir_lib.eval_results(model_dir, split),
                                 {"prompt_file": prompt_file, "metrics": metrics})
    return results
