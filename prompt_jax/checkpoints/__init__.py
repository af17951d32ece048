"""Reading and writing model checkpoints: Hugging Face directories and t5x checkpoints (the
frozen model: `load_checkpoint` never returns prompt variables), and prompt artifacts
(`prompt_artifacts`: .npy, PEFT adapters, prompt-tuned t5x checkpoints)."""

from __future__ import annotations

import os
import re
from typing import Any

from prompt_jax.checkpoints.hf import load_hf, save_hf
from prompt_jax.checkpoints.t5x import is_t5x_checkpoint, latest_step_dir, load_t5x
from prompt_jax.t5.config import T5Config

__all__ = ["load_checkpoint", "load_hf", "load_t5x", "save_hf"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_checkpoint(path: str, config: T5Config | None = None
                    ) -> tuple[T5Config, dict[str, Any]]:
    """Load a T5 -> (config, params as nested dicts of numpy arrays, t5x names).

    `path` is one of: a Hugging Face directory (`config.json` + `model.safetensors`
    or a sharded index), a hub id such as `google/t5-base-lm-adapt` (downloaded, safetensors
    only), a t5x `checkpoint_<N>` directory (local or `gs://`), or a t5x model directory
    holding `checkpoint_<N>` subdirectories (the latest is read). With `config`, the
    checkpoint's shapes are checked against it and the weights cast to its `param_dtype`.
    """
    path = os.fspath(path)
    if path.startswith("gs://"):
        return load_t5x(path, config)
    if os.path.isfile(path) and os.path.basename(path) == "checkpoint":
        path = os.path.dirname(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return load_hf(path, config)
        if is_t5x_checkpoint(path):
            return load_t5x(path, config)
        latest = latest_step_dir(path)
        if latest:
            return load_t5x(latest, config)
        raise FileNotFoundError(
            f"{path}: not a checkpoint (expected a Hugging Face directory with config.json, "
            "a t5x checkpoint_<N> directory with a 'checkpoint' file, or a directory of those)")
    if not os.path.exists(path) and _HUB_ID.match(path):
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])
        return load_hf(local, config)
    raise FileNotFoundError(f"{path}: checkpoint path does not exist")
