"""The MODEL_DIR of a run: every file name in it, and the reads and writes of them.

    MODEL_DIR/
      config.gin          the operative gin config of the run (written once it has loaded)
      metrics.jsonl       one JSON object per line: `step`; train lines `loss` (cross-entropy
                          per target token), `objective` (t5x's summed loss with z-loss, what
                          is differentiated), ...; eval lines `split` and the task's metrics
      tb/<split>/         TensorBoard scalars of the same
      checkpoints/<step>/ train state (orbax): step, trainable params, optimizer state
      prompts/<step>.npy  the prompt at each checkpoint ([P, E] float32)
      task_prompts/<task>/<step>.npy, task_prompts/<task>/best_prompt.npy
                          multi-task prompts (methods/multitask.py): each task's combined
                          prompt [P_t, E] at each checkpoint and at the best eval
      best_prompt.npy     the prompt of the best validation eval so far (early stopping)
      deep_prompts/<step>.npz, best_deep_prompt.npz
                          deep prompts (P-tuning v2, prefix tuning; methods/deep_prompts.py):
                          the key/value prefix matrix (a projection's output) with its layout
      best.json           {step, metric, value, metrics} of that eval
      base_model/         the frozen weights of a run that started from random weights (HF)
      hf_export/          the final weights as an HF directory (`train.export_hf`)
      eval_<split>.json   what `prompt-jax eval` measured
      predictions.jsonl   what `prompt-jax infer` wrote (default OUTPUT_FILE)

Only process 0 writes. `prepare` decides whether a train run may use the directory.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from prompt_jax.files import write_text_atomically
from prompt_jax.logs import is_primary

CONFIG = "config.gin"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
CHECKPOINTS = "checkpoints"
PROMPTS = "prompts"
TASK_PROMPTS = "task_prompts"
DEEP_PROMPTS = "deep_prompts"
BEST_DEEP_PROMPT = "best_deep_prompt.npz"
BEST_PROMPT = "best_prompt.npy"
BEST = "best.json"
BASE_MODEL = "base_model"
HF_EXPORT = "hf_export"
PREDICTIONS = "predictions.jsonl"

# What a train run writes, and what `--overwrite` clears (eval/infer outputs are kept).
RUN_OUTPUTS = (CHECKPOINTS, PROMPTS, TASK_PROMPTS, DEEP_PROMPTS, TENSORBOARD, METRICS,
               BEST_PROMPT, BEST_DEEP_PROMPT, BEST, BASE_MODEL, HF_EXPORT, CONFIG)

# The first line of every config.gin this version writes. A run whose config.gin lacks it
# was made when TASK_FEATURE_LENGTHS['inputs'] counted the prompt's positions (the text was
# cut to inputs - P); resuming it now would feed it longer inputs, so it is refused.
CONFIG_HEADER = ("# prompt_jax config v2: TASK_FEATURE_LENGTHS['inputs'] is the input text; "
                 "the prompt comes on top")

# Config lines that may change when a run is resumed: where it lives (a moved MODEL_DIR),
# how long it runs (TRAIN_STEPS) and how often it evaluates (EVAL_PERIOD): none of them
# changes the steps already taken or those to come.
_RESUMABLE_CHANGES = ("MODEL_DIR =", "train.model_dir =", "TRAIN_STEPS =", "train.train_steps =",
                      "EVAL_PERIOD =", "train.eval_period =")


def path(model_dir: str, name: str) -> str:
    return os.path.join(model_dir, name)


def prompt_at(model_dir: str, step: int) -> str:
    """`prompts/<step>.npy`."""
    return os.path.join(model_dir, PROMPTS, f"{step}.npy")


def task_prompt_at(model_dir: str, task: str, step: int | None = None) -> str:
    """`task_prompts/<task>/<step>.npy`; without a step `task_prompts/<task>/best_prompt.npy`."""
    name = BEST_PROMPT if step is None else f"{step}.npy"
    return os.path.join(model_dir, TASK_PROMPTS, task, name)


def deep_prompt_at(model_dir: str, step: int) -> str:
    """`deep_prompts/<step>.npz`."""
    return os.path.join(model_dir, DEEP_PROMPTS, f"{step}.npz")


def eval_results(model_dir: str, split: str) -> str:
    """`eval_<split>.json`."""
    return os.path.join(model_dir, f"eval_{split}.json")


def check_is_directory(model_dir: str) -> None:
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise ValueError(f"MODEL_DIR={model_dir!r} is a file, not a directory; choose a "
                         "directory for the run's outputs")


def holds_run(model_dir: str) -> bool:
    """Whether `model_dir` holds a train run (a finished checkpoint)."""
    directory = os.path.join(model_dir, CHECKPOINTS)
    return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def comparable(config: str) -> list[str]:
    """Config lines minus comments, blank lines and what may change on resume."""
    return sorted(line.strip() for line in config.splitlines()
                  if line.strip() and not line.lstrip().startswith("#")
                  and not line.strip().startswith(_RESUMABLE_CHANGES))


def prepare(model_dir: str, config: str, overwrite: bool) -> None:
    """Make `model_dir` ready for a train run with the operative `config` (gin's text).

    A directory holding a run with another config is refused unless `overwrite`, which
    clears that run's outputs (`RUN_OUTPUTS`) first.
    """
    check_is_directory(model_dir)
    previous = path(model_dir, CONFIG)
    if holds_run(model_dir) and os.path.exists(previous) and not overwrite:
        with open(previous) as f:
            text = f.read()
        if not text.startswith(CONFIG_HEADER):
            raise ValueError(
                f"{previous}: this run was made by an older prompt_jax, where "
                "TASK_FEATURE_LENGTHS['inputs'] counted the prompt (its text was cut to inputs "
                "- PROMPT_LENGTH); now inputs is the text budget and the prompt comes on top. "
                "Resuming would change its data: start over with --overwrite (and inputs set "
                "to the old value - PROMPT_LENGTH to keep its lengths), or use another "
                "MODEL_DIR")
        if comparable(text) != comparable(config):
                raise ValueError(
                    f"{model_dir} holds a run with a different config ({previous}); resume it "
                    "with the same config, choose another MODEL_DIR, or pass --overwrite to "
                    "start over there")
    if overwrite and os.path.isdir(model_dir) and is_primary():
        for name in RUN_OUTPUTS:
            target = path(model_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.unlink(target)
    if is_primary():
        os.makedirs(model_dir, exist_ok=True)


def write_config(model_dir: str, config: str) -> None:
    if is_primary():
        write_text_atomically(path(model_dir, CONFIG), f"{CONFIG_HEADER}\n{config}")


def read_config(model_dir: str) -> str | None:
    """The run's `config.gin`, or None."""
    p = path(model_dir, CONFIG)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        return f.read()


def read_best(model_dir: str) -> dict[str, Any] | None:
    """best.json: {step, metric, value, metrics}, or None before the first eval."""
    return read_json(path(model_dir, BEST))


def write_best(model_dir: str, best: dict[str, Any]) -> None:
    if is_primary():
        write_json(path(model_dir, BEST), best)


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl ([] if none)."""
    p = path(model_dir, METRICS)
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(model_dir: str) -> int:
    """The highest step metrics.jsonl records (0 if none)."""
    return max((r["step"] for r in read_metrics(model_dir)), default=0)


def finished(model_dir: str, steps: int) -> bool:
    """Whether a run reached `steps` and evaluated at least once."""
    return os.path.exists(path(model_dir, BEST)) and last_step(model_dir) >= steps


def final_eval(model_dir: str) -> dict[str, float]:
    """The metrics of the run's last eval line."""
    lines = [r for r in read_metrics(model_dir) if r.get("split")]
    if not lines:
        raise ValueError(f"{path(model_dir, METRICS)}: no eval line")
    last = max(lines, key=lambda r: r["step"])
    return {k: v for k, v in last.items() if k not in ("step", "split")}


def read_json(p: str) -> Any:
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def write_json(p: str, obj: Any) -> None:
    """Atomically (a crash leaves the previous file)."""
    write_text_atomically(p, json.dumps(obj, indent=1))
