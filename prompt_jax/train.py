"""The train job: prompt tuning (or model tuning) with eval, early stopping, checkpoints, resume.

    prompt-jax train --gin_file=runs/prompt_finetune.gin --gin.MODEL_DIR=... ...

Writes to MODEL_DIR: `config.gin` (the operative config), `metrics.jsonl`, `tb/`,
`checkpoints/<step>` (orbax: step, trainable params, optimizer state; never the
frozen weights), `prompts/<step>.npy` at each save, `best_prompt.npy` (best
validation metric so far: the paper's early stopping) and `best.json`. Running
the same command again resumes from the newest checkpoint with the same data
order, so an interrupted run ends with exactly the prompt of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from collections.abc import Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_jax import build, logs, optim, partitioning, prompts
from prompt_jax.checkpoints import save_hf
from prompt_jax.checkpoints.train_state import TrainStateCheckpointer
from prompt_jax.checkpoints.tree import PROMPT_PATH
from prompt_jax.pytree import flatten
from prompt_jax.t5.model import T5
from prompt_jax.trainer import LossConfig, TrainState, make_train_step

gin.external_configurable(optim.adafactor, "adafactor")
gin.external_configurable(optim.rsqrt_schedule, "rsqrt_schedule")
gin.external_configurable(optax.piecewise_constant_schedule, "piecewise_constant_schedule")
gin.external_configurable(LossConfig, "LossConfig")


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
          trainable: Sequence[str] = optim.DEFAULT_TRAINABLE, optimizer: Any = None,
          loss: LossConfig = LossConfig(), eval_split: str | None = "validation",
          eval_examples: int | None = None, eval_batch_size: int | None = None,
          early_stopping_metric: str | None = None, seed: int = 0, data_seed: int = 0,
          log_period: int = 10, mesh_shape: Sequence[int] = (-1, 1), export_hf: bool = False,
          dry_run: bool = False, overwrite: bool = False) -> TrainResult | None:
    """Train; see the module docstring. `optimizer` defaults to the paper's Adafactor.

    With `export_hf`, the final weights (frozen + trained, without the prompt) are written
    as a Hugging Face directory to MODEL_DIR/hf_export: how a pretraining run hands its
    model to the next stage (LM adaptation, then prompt tuning).
    """
    import seqio

    from prompt_jax import data, tasks  # tf/seqio: imported only by jobs that read data

    _check_args(train_steps, batch_size, eval_period, prompt_length, task_feature_lengths)
    if prompt_length == 0 and tuple(trainable) == tuple(optim.DEFAULT_TRAINABLE):
        raise ValueError("PROMPT_LENGTH=0 leaves nothing to train: prompt tuning needs "
                         "PROMPT_LENGTH > 0 (model tuning sets TRAINABLE=['.*'])")
    data.check_name(mixture_or_task_name)
    checkpoint_period = checkpoint_period or eval_period
    config = model.config()
    if dry_run:  # a hypothetical mesh: the devices need not exist here
        from prompt_jax import memory

        shape = tuple(mesh_shape)
        if -1 in shape:
            other = shape[1 - shape.index(-1)]
            shape = tuple(max(jax.device_count() // other, 1) if d == -1 else d for d in shape)
        if batch_size % shape[0]:
            raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel "
                             f"size {shape[0]} (MESH_SHAPE={shape})")
        report = memory.memory_report(
            config, shape, prompt_length=prompt_length, trainable_regexes=tuple(trainable),
            batch_size=batch_size, input_length=task_feature_lengths["inputs"] - prompt_length,
            target_length=task_feature_lengths["targets"], frozen_dtype=config.param_dtype,
            activation_dtype=config.dtype)
        print(memory.format_report(report))
        return None
    mesh = partitioning.make_mesh(mesh_shape)
    data_parallel = mesh.shape["data"]
    if batch_size % data_parallel:
        raise ValueError(f"BATCH_SIZE={batch_size} is not divisible by the data-parallel size "
                         f"{data_parallel} (MESH_SHAPE={tuple(mesh.shape.values())})")

    _prepare_model_dir(model_dir, overwrite)
    run_log = logs.RunLog(model_dir)

    # ---- model, frozen weights, prompt: created directly sharded on the mesh
    config, frozen_host = build.load_frozen(model, initial_checkpoint, model_dir, seed)
    t5 = T5(config, prompt_length=prompt_length)
    tokens = jnp.ones((1, 2), jnp.int32)
    abstract = jax.eval_shape(lambda r: t5.init(r, tokens, tokens)["params"],
                              jax.random.PRNGKey(0))
    shardings = partitioning.params_shardings(mesh, abstract)
    host = dict(flatten(frozen_host))
    if prompt_length:
        initializer = build.prompt_initializer(prompt_init, build.embedding_table(frozen_host),
                                               tasks.get_vocabulary(),
                                               tasks.class_labels(mixture_or_task_name))
        host[PROMPT_PATH] = np.asarray(initializer(jax.random.PRNGKey(seed + 1),
                                                   (prompt_length, config.d_model)))
    trainable_host, frozen_host = optim.split_params(optim.unflatten(host), trainable)
    trainable_sh, frozen_sh = optim.split_params(shardings, trainable)
    frozen = partitioning.shard_params(frozen_host, frozen_sh) if frozen_host else {}
    tx = optimizer or optim.adafactor()
    state_sh = TrainState(step=partitioning.to_shardings(mesh, partitioning.P()),
                          trainable=trainable_sh,
                          opt_state=partitioning.opt_state_shardings(
                              tx, jax.eval_shape(lambda: trainable_host), trainable_sh))
    create = partitioning.sharded_jit(lambda t: TrainState.create(t, tx), mesh,
                                      in_shardings=(trainable_sh,), out_shardings=state_sh)
    state = create(partitioning.shard_params(trainable_host, trainable_sh))

    # ---- resume
    checkpointer = TrainStateCheckpointer(os.path.join(model_dir, "checkpoints"),
                                          keep_checkpoints)
    restored = checkpointer.restore(jax.eval_shape(lambda: state), state_sh)
    best = _read_best(model_dir)
    start_step = 0
    if restored:
        state, start_step = restored
        run_log.truncate_after(start_step)
        if best and best["step"] > start_step:
            best = None
        _say(f"resuming {model_dir} from step {start_step}")

    # ---- data
    for split in ("train",) + ((eval_split,) if eval_split else ()):
        # Counted on (at most) the first 10,000 examples per task: start-up stays quick on
        # large splits, and the report says over how many it counted.
        truncation = data.count_truncated(mixture_or_task_name, split, task_feature_lengths,
                                          prompt_length, max_examples=10_000)
        if truncation.truncated:
            _say(f"{split}: {truncation}")
    shard_index, num_shards = partitioning.data_shard(mesh)
    per_process = batch_size // num_shards
    train_ds = data.get_dataset(mixture_or_task_name, "train", task_feature_lengths,
                                prompt_length, shuffle=True, seed=data_seed, num_epochs=None,
                                shard_info=seqio.ShardInfo(shard_index, num_shards))
    batches = train_ds.batch(per_process, drop_remainder=True).skip(start_step)
    batches = batches.prefetch(2).as_numpy_iterator()

    evaluator = None
    if eval_split:
        from prompt_jax.evaluation import TaskEvaluator

        evaluator = TaskEvaluator(
            t5, mixture_or_task_name, eval_split, task_feature_lengths,
            eval_batch_size or batch_size, num_examples=eval_examples,
            shard_batch=lambda b: partitioning.replicated_batch(b, mesh))

    step_fn = partitioning.sharded_jit(
        make_train_step(t5, tx, loss, dropout_seed=seed), mesh,
        in_shardings=(state_sh, frozen_sh, partitioning.batch_sharding(mesh)),
        out_shardings=(state_sh, None), donate_argnums=(0,))
    merged = partitioning.sharded_jit(optim.merge_params, mesh,
                                      in_shardings=(trainable_sh, frozen_sh),
                                      out_shardings=shardings)

    # ---- loop
    _write_config(model_dir)
    stop = _SignalFlag()
    progress = logs.Progress(train_steps, start_step, batch_size)
    step, pending = start_step, None
    last_good = checkpointer.latest_step()

    def save(at_step: int) -> None:
        nonlocal last_good
        _check_finite(state, at_step, last_good, model_dir)
        checkpointer.save(at_step, state)
        last_good = at_step
        if PROMPT_PATH in flatten(state.trainable) and logs.is_primary():
            prompts.save_prompt(os.path.join(model_dir, "prompts", f"{at_step}.npy"),
                                _prompt(state))

    def evaluate(at_step: int) -> None:
        nonlocal best
        results = evaluator.evaluate(merged(state.trainable, frozen), step=at_step)
        metrics = _flat(results)
        run_log.write(at_step, metrics, split=eval_split)
        progress.write(f"step {at_step} {eval_split}: "
                       + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        name = early_stopping_metric or _default_metric(metrics)
        if name not in metrics:
            raise ValueError(f"early_stopping_metric {name!r} is not among the eval metrics "
                             f"{sorted(metrics)}")
        sign = -1.0 if _is_loss(name) else 1.0  # losses: lower is better
        if best is None or sign * metrics[name] > sign * best["value"]:
            best = {"step": at_step, "metric": name, "value": metrics[name], "metrics": metrics}
            if logs.is_primary():
                if PROMPT_PATH in flatten(state.trainable):
                    prompts.save_prompt(os.path.join(model_dir, "best_prompt.npy"),
                                        _prompt(state))
                _write_json(os.path.join(model_dir, "best.json"), best)

    try:
        with stop:
            while step < train_steps:
                try:
                    local = next(batches)
                except StopIteration:
                    raise ValueError(f"{mixture_or_task_name}: the train split yielded no full "
                                     f"batch of {per_process} examples") from None
                state, metrics = step_fn(state, frozen, partitioning.global_batch(local, mesh))
                step += 1
                # Read the previous step's metrics: the device runs ahead by one step.
                if pending is not None:
                    _log_train(*pending, run_log, progress, log_period, last_good, model_dir)
                pending = (step, metrics)
                if step % checkpoint_period == 0 or step == train_steps or stop.raised:
                    _log_train(*pending, run_log, progress, log_period, last_good, model_dir)
                    pending = None
                    save(step)
                if evaluator and (step % eval_period == 0 or step == train_steps):
                    evaluate(step)
                if stop.raised:
                    progress.write(f"received {stop.raised}: saved step {step} to "
                                   f"{checkpointer.directory}; exiting")
                    return TrainResult(step, best, stopped_by_signal=True)
            if pending is not None:
                _log_train(*pending, run_log, progress, log_period, last_good, model_dir)
        if export_hf:
            params = jax.device_get(merged(state.trainable, frozen))
            if logs.is_primary():
                save_hf(config, jax.tree.map(np.asarray, params),
                        os.path.join(model_dir, "hf_export"))
    finally:
        progress.close()
        run_log.close()
        checkpointer.close()
    return TrainResult(step, best)


# --------------------------------------------------------------------------- helpers


def _check_args(train_steps, batch_size, eval_period, prompt_length, lengths) -> None:
    if not isinstance(lengths, dict) or {"inputs", "targets"} - set(lengths):
        raise ValueError(f"TASK_FEATURE_LENGTHS must be a dict with 'inputs' and 'targets', "
                         f"got {lengths!r}")
    for name, value in (("TRAIN_STEPS", train_steps), ("BATCH_SIZE", batch_size),
                        ("EVAL_PERIOD", eval_period)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"PROMPT_LENGTH must be a non-negative integer, got {prompt_length!r}")
    if prompt_length >= lengths["inputs"]:
        raise ValueError(f"PROMPT_LENGTH={prompt_length} leaves no room for input tokens in "
                         f"the encoder length TASK_FEATURE_LENGTHS['inputs']="
                         f"{lengths['inputs']}; it must be smaller")


def _prepare_model_dir(model_dir: str, overwrite: bool) -> None:
    """Refuse a MODEL_DIR holding a run (checkpoints) with another config, unless
    `overwrite`, which clears that run's outputs first."""
    path = os.path.join(model_dir, "config.gin")
    has_run = bool(TrainStateCheckpointer.existing_steps(os.path.join(model_dir, "checkpoints")))
    if has_run and os.path.exists(path) and not overwrite:
        with open(path) as f:
            previous = _comparable(f.read())
        if previous != _comparable(gin.config_str()):
            raise ValueError(
                f"{model_dir} holds a run with a different config ({path}); resume it with "
                "the same config, choose another MODEL_DIR, or pass --overwrite to start over "
                "there")
    if overwrite and os.path.isdir(model_dir) and logs.is_primary():
        import shutil

        for name in ("checkpoints", "prompts", "tb", "metrics.jsonl", "best_prompt.npy",
                     "best.json", "base_model", "hf_export", "config.gin"):
            target = os.path.join(model_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.unlink(target)
    if logs.is_primary():
        os.makedirs(model_dir, exist_ok=True)


def _write_config(model_dir: str) -> None:
    """The run's config, written once everything it names has loaded."""
    if logs.is_primary():
        with open(os.path.join(model_dir, "config.gin"), "w") as f:
            f.write(gin.config_str())


def _comparable(config: str) -> list[str]:
    """Config lines minus comments, blank lines and what may change on resume: where the
    run lives (a moved MODEL_DIR) and how long it runs (extending TRAIN_STEPS)."""
    skip = ("MODEL_DIR =", "train.model_dir =", "TRAIN_STEPS =", "train.train_steps =")
    return sorted(line.strip() for line in config.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")
                  and not line.strip().startswith(skip))


def _log_train(step, metrics, run_log, progress, log_period, last_good, model_dir) -> None:
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics["loss"]):
        where = (f"the last good checkpoint is step {last_good} in {model_dir}/checkpoints"
                 if last_good is not None else "no checkpoint was saved yet")
        raise TrainingError(f"step {step}: loss is {metrics['loss']}; stopping ({where})")
    rate = progress.update(step, metrics["loss"])
    if step % log_period == 0:
        run_log.write(step, {**metrics, "examples_per_second": rate})


def _check_finite(state: TrainState, step: int, last_good: int | None, model_dir: str) -> None:
    finite = jax.tree.map(lambda x: jnp.isfinite(x).all(), state.trainable)
    if not all(bool(x) for x in jax.tree.leaves(finite)):
        where = (f"the last good checkpoint is step {last_good}" if last_good is not None
                 else "no checkpoint was saved yet")
        raise TrainingError(f"step {step}: parameters hold NaN/inf; not saving ({where} in "
                            f"{model_dir}/checkpoints)")


def _is_loss(name: str) -> bool:
    return name == "loss" or name.endswith("/loss")


def _default_metric(metrics: dict[str, float]) -> str:
    """The task's first metric (e.g. accuracy); the validation loss if it has none."""
    return next((k for k in metrics if not _is_loss(k)), next(iter(metrics)))


def _prompt(state: TrainState) -> np.ndarray:
    return np.asarray(jax.device_get(flatten(state.trainable)[PROMPT_PATH]))


def _flat(results: dict[str, dict[str, float]]) -> dict[str, float]:
    from prompt_jax.evaluation import flat_metrics

    return flat_metrics(results)


def _read_best(model_dir: str) -> dict[str, Any] | None:
    path = os.path.join(model_dir, "best.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


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

