"""The train job: prompt tuning (or model tuning) with eval, early stopping, checkpoints, resume.

    prompt-jax train --gin_file=runs/prompt_finetune.gin --gin.MODEL_DIR=... ...

What it writes to MODEL_DIR is listed in `prompt_jax.model_dir`. Running the same
command again resumes from the newest verified checkpoint with the same data order, so
an interrupted run ends with exactly the prompt of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import build, logs, optim, partitioning, prompts
from prompt_jax import model_dir as model_dir_lib
from prompt_jax.checkpoints import save_hf
from prompt_jax.checkpoints.train_state import TrainStateCheckpointer
from prompt_jax.evaluation import flat_metrics, format_metrics, is_loss
from prompt_jax.methods import deep_prompts, multitask, p_tuning
from prompt_jax.methods.deep_prompts import DeepPromptSpec
from prompt_jax.methods.multitask import MultitaskPrompts
from prompt_jax.methods.p_tuning import PromptEncoderSpec
from prompt_jax.pytree import flatten
from prompt_jax.t5.model import T5, abstract_params
from prompt_jax.train_step import (
    LossConfig,
    TrainState,
    check_num_microbatches,
    initial_state,
    jit_train_step,
    make_train_step,
)

gin.external_configurable(optim.adafactor, "adafactor")
gin.external_configurable(optim.rsqrt_schedule, "rsqrt_schedule")
gin.external_configurable(optim.checkpoint_step_offset, "checkpoint_step_offset")
gin.external_configurable(optax.piecewise_constant_schedule, "piecewise_constant_schedule")
gin.external_configurable(LossConfig, "LossConfig")
# AdamW, the optimizer of the P-tuning v2 reference (HF Trainer; methods/p_tuning_v2_head.gin).
gin.external_configurable(optax.adamw, "adamw")
gin.external_configurable(optax.linear_schedule, "linear_schedule")


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss); earlier checkpoints are intact."""


@dataclasses.dataclass
class TrainResult:
    step: int
    best: dict[str, Any] | None
    stopped_by_signal: bool = False


@gin.configurable(denylist=["dry_run", "overwrite"])
def train(*, model_dir: str = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: dict[str, int] = gin.REQUIRED, train_steps: int = gin.REQUIRED,
          batch_size: int = 32, eval_period: int = 1000, checkpoint_period: int | None = None,
          keep_checkpoints: int = 2, model: build.ModelSpec = build.ModelSpec(),
          initial_checkpoint: str | None = None, prompt_length: int = 100,
          prompt_init: build.PromptInit = build.PromptInit(),
          prompt_encoder: PromptEncoderSpec | None = None,
          multitask_prompts: MultitaskPrompts | None = None,
          deep_prompt: DeepPromptSpec | None = None,
          trainable: Sequence[str] = optim.DEFAULT_TRAINABLE, optimizer: Any = None,
          loss: LossConfig = LossConfig(), eval_split: str | None = "validation",
          eval_examples: int | None = None, eval_batch_size: int | None = None,
          truncate_eval_inputs: bool = False, early_stopping_metric: str | None = None,
          seed: int = 0, data_seed: int = 0, log_period: int = 10,
          mesh_shape: Sequence[int] = (-1, 1), num_microbatches: int = 1, export_hf: bool = False,
          dry_run: bool = False, overwrite: bool = False) -> TrainResult | None:
    """Train; see the module docstring. `optimizer` defaults to the paper's Adafactor.

    `task_feature_lengths['inputs']` is the input text's budget; the prompt's
    `prompt_length` positions come on top (the reference's semantics). With `export_hf`,
    the final weights (frozen + trained, without the prompt) are written as a Hugging Face
    directory to MODEL_DIR/hf_export: how a pretraining run hands its model to the next
    stage (LM adaptation, then prompt tuning). `num_microbatches` accumulates the gradient
    of each batch over that many microbatches in the step (activation memory of one
    microbatch; the same update, `train_step.make_train_step`). `multitask_prompts`
    (methods/multitask.gin) trains a shared prompt and one per task of the mixture in
    place of the one prompt (`prompt_length` 0; methods/multitask.py). `deep_prompt`
    (methods/p_tuning_v2.gin, methods/prefix_tuning.gin) adds learned key/value prefixes
    to the attention (methods/deep_prompts.py), saved as deep_prompts/<step>.npz and
    best_deep_prompt.npz.
    """
    from prompt_jax import data

    _check_args(train_steps, batch_size, eval_period, prompt_length, trainable,
                multitask_prompts, deep_prompt)
    lengths = data.check_lengths(task_feature_lengths)
    data.check_name(mixture_or_task_name)
    if deep_prompt is not None:  # a classification head is sized by the task's labels
        deep_prompt = deep_prompt.with_classes(mixture_or_task_name)
    head_labels = _head_labels(deep_prompt, loss, mixture_or_task_name, lengths)
    tx = optimizer or optim.adafactor()
    if dry_run:  # a hypothetical mesh: the devices need not exist here
        config = model.config()
        _print_memory_plan(config, method_model(config, mixture_or_task_name, prompt_length,
                                                prompt_encoder, multitask_prompts, deep_prompt),
                           mesh_shape, batch_size, trainable, lengths, tx, num_microbatches)
        return None
    mesh = partitioning.make_mesh(mesh_shape)
    partitioning.check_batch_size(batch_size, mesh.shape["data"])
    check_num_microbatches(batch_size, mesh.shape["data"], num_microbatches)
    model_dir_lib.prepare(model_dir, gin.config_str(), overwrite)

    run = _Run(model_dir, mesh, keep_checkpoints, early_stopping_metric)
    try:
        run.setup_state(model, initial_checkpoint, prompt_length, prompt_init, trainable, tx,
                        seed, mixture_or_task_name, prompt_encoder, multitask_prompts,
                        deep_prompt)
        step_fn = jit_train_step(make_train_step(run.model, tx, loss, dropout_seed=seed,
                                                 num_microbatches=num_microbatches,
                                                 pet=_pet_targets(loss, run.model,
                                                                  mixture_or_task_name,
                                                                  lengths),
                                                 head_labels=head_labels),
                                 mesh, run.shardings)
        batches = _train_batches(mixture_or_task_name, lengths, batch_size, mesh, data_seed,
                                 run.start_step, getattr(run.model, "task_names", None))
        evaluator = _evaluator(run.model, mixture_or_task_name, eval_split, lengths,
                               eval_batch_size or batch_size, mesh, eval_examples,
                               truncate_eval_inputs) if eval_split else None
        if evaluator is not None:
            check_early_stopping_metric(early_stopping_metric, evaluator.loss_names())
        model_dir_lib.write_config(model_dir, gin.config_str())
        return _loop(run, step_fn, batches, evaluator, eval_split, train_steps,
                     checkpoint_period or eval_period, eval_period, log_period, batch_size,
                     export_hf)
    finally:
        run.close()


def _loop(run: _Run, step_fn, batches, evaluator, eval_split, train_steps, checkpoint_period,
          eval_period, log_period, batch_size, export_hf) -> TrainResult:
    """The training loop: step, log, checkpoint, evaluate, stop cleanly on a signal."""
    progress = logs.Progress(train_steps, run.start_step, batch_size)
    step, pending, stop = run.start_step, None, _SignalFlag()
    try:
        with stop:
            while step < train_steps:
                run.state, metrics = step_fn(run.state, run.frozen, next(batches))
                step += 1
                # Read the previous step's metrics: the device runs ahead by one step.
                if pending is not None:
                    run.log_train(*pending, progress, log_period)
                pending = (step, metrics)
                if step % checkpoint_period == 0 or step == train_steps or stop.raised:
                    run.log_train(*pending, progress, log_period)
                    pending = None
                    run.save(step)
                if evaluator and (step % eval_period == 0 or step == train_steps):
                    run.evaluate(evaluator, eval_split, step, progress)
                if stop.raised:
                    progress.write(f"received {stop.raised}: saved step {step} to "
                                   f"{run.checkpointer.directory}; exiting")
                    return TrainResult(step, run.best, stopped_by_signal=True)
            if pending is not None:
                run.log_train(*pending, progress, log_period)
        if export_hf:
            run.export_hf()
    finally:
        progress.close()
    return TrainResult(step, run.best)


class _Run:
    """One run's state on the mesh and what it writes to MODEL_DIR."""

    def __init__(self, model_dir: str, mesh: Any, keep_checkpoints: int,
                 early_stopping_metric: str | None):
        self.model_dir, self.mesh = model_dir, mesh
        self.early_stopping_metric = early_stopping_metric
        self.run_log = logs.RunLog(model_dir)
        self.checkpointer = TrainStateCheckpointer(
            model_dir_lib.path(model_dir, model_dir_lib.CHECKPOINTS), keep_checkpoints)
        self.best = model_dir_lib.read_best(model_dir)
        self.start_step = 0
        self.last_good: int | None = None  # the newest checkpoint known to be intact

    def setup_state(self, spec, initial_checkpoint, prompt_length, prompt_init, trainable, tx,
                    seed, task_name, prompt_encoder=None, multitask_prompts=None,
                    deep_prompt=None) -> None:
        """The frozen model, the first prompt, the sharded state; resumed if a checkpoint
        of this run verifies."""
        from prompt_jax import tasks

        config, frozen_host = build.load_frozen(spec, initial_checkpoint, self.model_dir, seed)
        self.config = config
        from prompt_jax.methods import verbalizers  # tf, seqio

        self.model = method_model(config, task_name, prompt_length, prompt_encoder,
                                  multitask_prompts, deep_prompt)
        host = dict(flatten(frozen_host))
        if prompt_length:
            # Class labels: a bound verbalizer's words, else the task's labels.
            initializer = build.prompt_initializer(prompt_init, build.embedding_table(frozen_host),
                                                   tasks.get_vocabulary(),
                                                   verbalizers.init_labels(task_name))
            # The prompt, or P-tuning's encoder inputs (with the encoder's first weights).
            host.update(p_tuning.initial_params(
                prompt_encoder or PromptEncoderSpec(),
                np.asarray(initializer(jax.random.PRNGKey(seed + 1),
                                       (prompt_length, config.d_model))),
                jax.random.PRNGKey(seed + 2)))
        if multitask_prompts is not None:  # a shared prompt and one per task
            host.update(multitask.initial_params(
                self.model, lambda labels: build.prompt_initializer(
                    prompt_init, build.embedding_table(frozen_host), tasks.get_vocabulary(),
                    labels), jax.random.PRNGKey(seed + 1)))
        if deep_prompt is not None:  # key/value prefixes (P-tuning v2, prefix tuning)
            host.update({f"{deep_prompts.DEEP_PROMPT_PATH}/{k}": v for k, v in flatten(
                deep_prompts.init_params(deep_prompt, config, jax.random.PRNGKey(seed + 3))
            ).items()})
        self.state, self.frozen, self.shardings = initial_state(
            self.mesh, self.model, optim.unflatten(host), trainable, tx)
        restored = self.checkpointer.restore(jax.eval_shape(lambda: self.state),
                                             self.shardings.state)
        if restored:
            self.state, self.start_step = restored
            self.last_good = self.start_step
            self.run_log.truncate_after(self.start_step)
            if self.best and self.best["step"] > self.start_step:
                self.best = None
            _say(f"resuming {self.model_dir} from step {self.start_step}")

    def params(self) -> Any:
        return optim.merge_params(self.state.trainable, self.frozen)

    def prompt(self) -> np.ndarray | None:
        """The prompt [P, E] (P-tuning: its encoder's output), what every prompt file holds."""
        return p_tuning.prompt_of(flatten(self.state.trainable), self.model.prompt_encoder)

    def log_train(self, step: int, metrics: Any, progress: logs.Progress, period: int) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(metrics["objective"]):
            raise TrainingError(f"step {step}: loss is {metrics['objective']}; stopping "
                                f"({self._where_good()})")
        rate = progress.update(step, metrics["loss"])
        if step % period == 0:
            self.run_log.write(step, {**metrics, "examples_per_second": rate})

    def save(self, step: int) -> None:
        finite = jax.tree.map(lambda x: jnp.isfinite(x).all(), self.state.trainable)
        if not all(bool(x) for x in jax.tree.leaves(finite)):
            raise TrainingError(f"step {step}: parameters hold NaN/inf; not saving "
                                f"({self._where_good()})")
        self.checkpointer.save(step, self.state)
        self.last_good = step
        self.save_artifacts(step)

    def evaluate(self, evaluator: Any, split: str, step: int, progress: logs.Progress) -> None:
        """Evaluate; keep the best prompt by the early-stopping metric (the paper's
        early stopping)."""
        metrics = flat_metrics(evaluator.evaluate(self.params(), step=step))
        self.run_log.write(step, metrics, split=split)
        progress.write(f"step {step} {split}: {format_metrics(metrics)}")
        name = self.early_stopping_metric or _default_metric(metrics)
        if name not in metrics:
            raise ValueError(f"early_stopping_metric {name!r} is not among the eval metrics "
                             f"{sorted(metrics)}")
        sign = -1.0 if is_loss(name) else 1.0  # losses: lower is better
        if self.best is None or sign * metrics[name] > sign * self.best["value"]:
            self.best = {"step": step, "metric": name, "value": metrics[name],
                         "metrics": metrics}
            self.save_artifacts(None)
            model_dir_lib.write_best(self.model_dir, self.best)

    def save_artifacts(self, step: int | None) -> None:
        """What inference needs of the trained method, at `step` (None: the best so far):
        the prompt [P, E] (P-tuning: its encoder's output) as prompts/<step>.npy |
        best_prompt.npy; a deep prompt's matrix (a projection's output) as
        deep_prompts/<step>.npz | best_deep_prompt.npz; multi-task prompts as
        task_prompts/<task>/<step>.npy | best_prompt.npy."""
        primary = logs.is_primary()
        prompt = self.prompt()
        if prompt is not None and primary:
            prompts.save_prompt(model_dir_lib.prompt_at(self.model_dir, step) if step is not None
                                else model_dir_lib.path(self.model_dir, model_dir_lib.BEST_PROMPT),
                                prompt)
        if (spec := self.model.deep_prompt_spec) is not None:
            params = jax.device_get(self.params()[deep_prompts.DEEP_PROMPT_PATH])
            matrix = deep_prompts.deep_prompt_matrix(spec, self.config, params)
            if primary:
                deep_prompts.save_deep_prompt(
                    model_dir_lib.deep_prompt_at(self.model_dir, step) if step is not None else
                    model_dir_lib.path(self.model_dir, model_dir_lib.BEST_DEEP_PROMPT),
                    spec, self.config, matrix, head=deep_prompts.head_of(spec, params))
        if isinstance(self.model, multitask.MultitaskT5) and primary:
            multitask.save_task_prompts(self.state.trainable, self.model, lambda task:
                                        model_dir_lib.task_prompt_at(self.model_dir, task, step))

    def export_hf(self) -> None:
        """The T5's own weights (frozen + trained; no method's parameters) as a Hugging
        Face directory."""
        params = jax.device_get(self.params())
        if logs.is_primary():
            t5_own = set(flatten(abstract_params(self.config)))
            params = {k: v for k, v in flatten(params).items() if k in t5_own}
            save_hf(self.config, optim.unflatten(jax.tree.map(np.asarray, params)),
                    model_dir_lib.path(self.model_dir, model_dir_lib.HF_EXPORT))

    def _where_good(self) -> str:
        """Names a checkpoint only once it has been read back against its checksums."""
        if self.last_good is None or not self.checkpointer.verified(self.last_good):
            return "no verified checkpoint of this run yet"
        return f"the last good checkpoint is step {self.last_good} in {self.checkpointer.directory}"

    def close(self) -> None:
        self.run_log.close()
        self.checkpointer.close()


# --------------------------------------------------------------------------- setup


def method_model(config: Any, task_name: str, prompt_length: int,
                 prompt_encoder: PromptEncoderSpec | None = None,
                 multitask_prompts: MultitaskPrompts | None = None,
                 deep_prompt: DeepPromptSpec | None = None) -> T5:
    """The T5 a run trains: the prompt (or P-tuning's encoder) placed by the task's
    template, multi-task prompts in its place, key/value prefixes beside it."""
    from prompt_jax.methods import templates  # tf, seqio

    # A template with soft tokens places the prompt's rows there (methods/templates.py).
    templates.check_prompt_length(task_name, prompt_length, "PROMPT_LENGTH")
    model = T5(config, prompt_length=prompt_length, prompt_encoder=prompt_encoder,
               soft_token_id=templates.model_soft_token_id(task_name))
    if multitask_prompts is not None:  # a shared prompt and one per task
        model = multitask_prompts.model(config, task_name)
    if deep_prompt is not None:  # key/value prefixes (P-tuning v2, prefix tuning)
        model = model.clone(deep_prompt_spec=deep_prompt)
    return model


def _check_args(train_steps, batch_size, eval_period, prompt_length, trainable,
                multitask_prompts=None, deep_prompt=None) -> None:
    for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                        ("EVAL_PERIOD", eval_period)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"PROMPT_LENGTH must be a non-negative integer, got {prompt_length!r}")
    if multitask_prompts is not None and prompt_length:
        raise ValueError(f"train.prompt_length={prompt_length}: multi-task prompts replace the "
                         "one prompt; set train.prompt_length = 0 (methods/multitask.gin does)")
    if (prompt_length == 0 and multitask_prompts is None and deep_prompt is None
            and tuple(trainable) == tuple(optim.DEFAULT_TRAINABLE)):
        raise ValueError("PROMPT_LENGTH=0 leaves nothing to train: prompt tuning needs "
                         "PROMPT_LENGTH > 0 (model tuning sets TRAINABLE=['.*'])")


def _pet_targets(loss: LossConfig, model: Any, task_name: str, lengths: dict[str, int]):
    """The task's verbalizer for PET's loss (`LossConfig.pet_weight`), else None."""
    weight = loss.pet_weight
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ValueError(f"LossConfig.pet_weight must be a number >= 0, got {weight!r}")
    if not weight:
        return None
    if isinstance(model, multitask.MultitaskT5):
        raise ValueError("LossConfig.pet_weight > 0 with multi-task prompts: PET's loss is "
                         "for one task's verbalizer; train one task")
    from prompt_jax.methods import verbalizers

    return verbalizers.pet_targets(task_name, lengths["targets"])


def _head_labels(deep_prompt: DeepPromptSpec | None, loss: LossConfig, task_name: str,
                 lengths: dict[str, int]) -> np.ndarray | None:
    """The label targets [C, L] by which the train step tells each row's class for a
    classification head (`DeepPromptSpec.classification_head`), else None."""
    if deep_prompt is None or not deep_prompt.classification_head:
        return None
    if loss.pet_weight:
        raise ValueError("LossConfig.pet_weight > 0 with DeepPromptSpec.classification_head: "
                         "the head replaces the decoder's words that PET scores; use one")
    from prompt_jax import rank_classification

    found = rank_classification.candidates(task_name, lengths["targets"])
    if found is None:
        raise ValueError(f"DeepPromptSpec.classification_head: {task_name}'s labels are not "
                         f"distinct targets at target length {lengths['targets']}")
    return found.tokens


def _print_memory_plan(config, model, mesh_shape, batch_size, trainable, lengths, tx,
                       num_microbatches):
    """The dry run: per-device memory of training `model` (the method's parameters
    included; the encoder sees the longest prompt) on a mesh this machine may lack."""
    from prompt_jax import memory

    shape = partitioning.resolve_mesh_shape(mesh_shape, jax.device_count())
    partitioning.check_batch_size(batch_size, shape[0])
    check_num_microbatches(batch_size, shape[0], num_microbatches)
    prompt_length = max(multitask.combined_lengths(model)) \
        if isinstance(model, multitask.MultitaskT5) else model.prompt_length
    report = memory.memory_report(
        config, shape, prompt_length=prompt_length, model=model,
        trainable_regexes=tuple(trainable),
        batch_size=batch_size, input_length=lengths["inputs"],
        target_length=lengths["targets"], frozen_dtype=config.param_dtype,
        activation_dtype=config.dtype, tx=tx, num_microbatches=num_microbatches,
        remat_policy=config.remat_policy)
    print(memory.format_report(report))


def _train_batches(task_name: str, lengths: dict[str, int], batch_size: int, mesh: Any,
                   data_seed: int, start_step: int, task_names: Sequence[str] | None = None):
    """This process's shard of the train split, batched, resumed after `start_step`
    batches, as global arrays on the mesh."""
    import seqio

    from prompt_jax import data

    # Counted on (at most) the first 10,000 examples: start-up stays quick on large splits.
    stats = data.length_stats(task_name, "train", lengths, max_examples=10_000)
    if stats.truncated:
        _say(f"train: {stats}")
    shard_index, num_shards = partitioning.data_shard(mesh)
    per_process = batch_size // num_shards
    get_dataset = data.get_dataset
    if task_names:  # multi-task prompts: every example with its task's index
        get_dataset = functools.partial(multitask.get_dataset, task_names=task_names)
    ds = get_dataset(task_name, "train", lengths, shuffle=True, seed=data_seed,
                          num_epochs=None, shard_info=seqio.ShardInfo(shard_index, num_shards))
    local = ds.batch(per_process, drop_remainder=True).skip(start_step).prefetch(2)

    def global_batches():
        for batch in local.as_numpy_iterator():
            yield partitioning.global_batch(batch, mesh)
        raise ValueError(f"{task_name}: the train split yielded no full batch of "
                         f"{per_process} examples")

    return global_batches()


def _evaluator(model, task_name, split, lengths, batch_size, mesh, num_examples, truncate):
    if isinstance(model, multitask.MultitaskT5):  # each task with its combined prompt
        return multitask.MultitaskEvaluator(model, split, lengths, batch_size, mesh=mesh,
                                            num_examples=num_examples, truncate_inputs=truncate)
    from prompt_jax.evaluation import TaskEvaluator

    evaluator = TaskEvaluator(model, task_name, split, lengths, batch_size, mesh=mesh,
                              num_examples=num_examples, truncate_inputs=truncate)
    if truncate and evaluator.stats.truncated:
        _say(f"{split}: {evaluator.stats}")
    return evaluator


def check_early_stopping_metric(name: str | None, losses: list[str]) -> None:
    """A loss as the early-stopping metric must be one the evaluation reports: checked before
    the first step rather than at the first eval (a mixture reports `<task>/loss` each, no
    plain `loss`). Other metrics' names are known only once the task's metrics have run."""
    if name is not None and is_loss(name) and name not in losses:
        raise ValueError(f"train.early_stopping_metric {name!r} is not a loss this evaluation "
                         f"reports; it reports {losses}")


def _default_metric(metrics: dict[str, float]) -> str:
    """The task's first metric (e.g. accuracy); the validation loss if it has none."""
    return next((k for k in metrics if not is_loss(k)), next(iter(metrics)))


def _say(message: str) -> None:
    if logs.is_primary():
        print(message, flush=True)


class _SignalFlag:
    """Within `with`, SIGTERM/SIGINT set `raised` instead of killing the process, so the loop
    can save a checkpoint and exit cleanly."""

    def __init__(self):
        self.raised: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


__all__ = ["TrainResult", "TrainState", "TrainingError", "train"]
