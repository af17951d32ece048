"""One entry point for a prompt from any ecosystem -> float32 `[P, E]`.

A prompt artifact is one of (`artifact_kind`):

- `npy`: a `.npy` file (the released prompts, `prompts.save_prompt`, the reference's
  `extract_variable` script; float32, bfloat16 or float16);
- `peft`: a Hugging Face PEFT PROMPT_TUNING or P_TUNING adapter directory;
- `t5x`: a prompt-tuned t5x checkpoint (`checkpoint_<N>`, its `checkpoint` file, or a
  model directory, whose latest step is read).

Anything else (a Hugging Face model directory, a t5x checkpoint without a prompt, a
multi-task checkpoint, ...) is refused with one line naming the path.
"""

from __future__ import annotations

import os

import numpy as np

from prompt_jax import prompts
from prompt_jax.checkpoints import peft, t5x

KINDS = ("npy", "peft", "t5x")
_EXPECTED = "a prompt is a .npy file, a PEFT adapter directory or a prompt-tuned t5x checkpoint"


def artifact_kind(path: str) -> str:
    """'npy', 'peft' or 't5x' from what `path` is (file names and magic bytes only)."""
    path = os.fspath(path)
    if path.startswith("gs://"):
        return "t5x"
    if os.path.isfile(path):
        if os.path.basename(path) == "checkpoint":
            return "t5x"
        with open(path, "rb") as f:
            magic = f.read(6)
        if path.endswith(".npy") or magic == b"\x93NUMPY":
            return "npy"
        raise ValueError(f"{path}: not a prompt artifact; {_EXPECTED}")
    if os.path.isdir(path):
        if peft.is_peft_adapter(path):
            return "peft"
        if t5x.is_t5x_checkpoint(path) or t5x.latest_step_dir(path):
            return "t5x"
        if os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path}: a Hugging Face model directory (config.json), not a "
                             f"prompt; {_EXPECTED}")
        raise ValueError(f"{path}: a directory with no adapter_config.json or t5x checkpoint; "
                         f"{_EXPECTED}")
    raise FileNotFoundError(f"{path}: prompt artifact does not exist")


def _t5x_summary(variables: dict[str, tuple[int, ...]]) -> str:
    if not variables:
        return "without a prompt"
    if set(variables) == {t5x.SHARED_PROMPT, t5x.TASK_PROMPTS}:
        return (f"with a multi-task prompt (shared_prompt {list(variables[t5x.SHARED_PROMPT])}, "
                f"{variables[t5x.TASK_PROMPTS][0]} task prompts)")
    return "with prompt variables " + ", ".join(f"target/{k} {list(v)}"
                                               for k, v in variables.items())


def describe(path: str) -> str:
    """One line saying what the artifact is and its prompt's shape, reading headers only."""
    kind = artifact_kind(path)
    if kind == "npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:
            return f"{path}: .npy file that is not a prompt ({e})"
        dtype = "bfloat16" if array.dtype.kind == "V" and array.dtype.itemsize == 2 else array.dtype
        return f"{path}: .npy prompt {list(array.shape)} {dtype}"
    if kind == "peft":
        config, _ = peft.read_adapter_config(path)
        return (f"{path}: PEFT {config.get('peft_type')} adapter, "
                f"{config.get('num_virtual_tokens')} virtual tokens x {config.get('token_dim')} "
                f"(task_type {config.get('task_type')})")
    directory, variables = t5x.prompt_variables(path)
    return f"{path}: t5x checkpoint {directory} {_t5x_summary(variables)}"


def load_prompt_artifact(path: str, d_model: int | None = None) -> np.ndarray:
    """The prompt in `path` (see `artifact_kind`) -> float32 [P, E].

    With `d_model`, E is checked against it. Raises FileNotFoundError for a missing
    path, ValueError naming the path (and the file/field, expected vs found) otherwise.
    """
    path = os.fspath(path)
    kind = artifact_kind(path)
    if kind == "peft":
        return peft.load_peft(path, d_model)
    if kind == "npy":
        prompt = prompts.load_prompt(path)
    else:
        found = t5x.t5x_prompts(path)
        if not found:
            raise ValueError(f"{path}: a t5x checkpoint without a prompt (no target/encoder/"
                             f"prompt/... variables); {_EXPECTED}")
        if "prompt" not in found:
            raise ValueError(f"{path}: a multi-task prompt checkpoint ({len(found)} task "
                             "prompts); pick one with prompt_jax.checkpoints.t5x.t5x_prompts"
                             "(path)['task_<i>']")
        prompt = found["prompt"]
    if d_model is not None and prompt.shape[1] != d_model:
        raise ValueError(f"{path}: prompt has shape {prompt.shape}, expected [P, {d_model}] "
                         "(d_model of the frozen model)")
    return prompt


def holds_prompt(checkpoint: str) -> bool:
    """Whether a model checkpoint (an INITIAL_CHECKPOINT) is a t5x checkpoint holding prompt
    variables: a hub id, an HF directory or a t5x checkpoint without a prompt give False."""
    try:
        if artifact_kind(checkpoint) != "t5x":
            return False
    except (ValueError, FileNotFoundError):
        return False
    _, variables = t5x.prompt_variables(checkpoint)
    return bool(variables)
