"""What a job builds before its loop: the model config, the frozen weights, the prompt.

Configurable from gin (the only gin-facing pieces besides the job functions):
`ModelSpec` (which T5, which dtypes) and `PromptInit` (how the prompt starts).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any

import gin
import jax
import numpy as np

from prompt_jax import prompts
from prompt_jax.checkpoints import load_checkpoint, save_hf
from prompt_jax.pytree import flatten
from prompt_jax.t5.config import SIZES, T5Config, get_config

PROMPT_INIT_KINDS = ("random_uniform", "sampled_vocab", "class_labels", "from_string",
                     "from_file")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which T5 (a name in `prompt_jax.t5.config.SIZES`) and its numerics.

    `param_dtype` is the dtype the frozen weights are held in (bfloat16 halves
    their memory); the prompt and its optimizer state are always float32.
    """

    size: str = "t5_1_1_base"
    dtype: str = "float32"
    param_dtype: str = "float32"
    dropout_rate: float = 0.1

    def config(self) -> T5Config:
        return get_config(self.size, dtype=self.dtype, param_dtype=self.param_dtype,
                          dropout_rate=self.dropout_rate)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptInit:
    """How the prompt starts (the paper's ablation, Figure 3b).

    kind: random_uniform | sampled_vocab | class_labels | from_string | from_file.
    `labels` defaults to the task's class labels; `path` is the `.npy` for from_file.
    """

    kind: str = "class_labels"
    scale: float = 0.5
    population_size: int = 5000
    labels: tuple[str, ...] | None = None
    text: str | None = None
    path: str | None = None

    def __post_init__(self):
        if self.kind not in PROMPT_INIT_KINDS:
            close = difflib.get_close_matches(self.kind, PROMPT_INIT_KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"PromptInit.kind={self.kind!r} is not one of "
                             f"{', '.join(PROMPT_INIT_KINDS)}{hint}")


def prompt_initializer(spec: PromptInit, embedding: np.ndarray, vocab: Any,
                       task_labels: tuple[str, ...] | None) -> prompts.Initializer:
    """The initializer `spec` describes, closed over the frozen embedding table."""
    sampled = prompts.sampled_vocab(embedding, spec.population_size)
    if spec.kind == "random_uniform":
        return prompts.random_uniform(spec.scale)
    if spec.kind == "sampled_vocab":
        return sampled
    if spec.kind == "class_labels":
        labels = spec.labels or task_labels
        if not labels:
            raise ValueError("PromptInit.kind='class_labels' but the task has no class labels; "
                             "set PromptInit.labels or use prompts/sampled_vocab.gin")
        return prompts.class_labels(embedding, vocab, labels, sampled)
    if spec.kind == "from_string":
        if not spec.text:
            raise ValueError("PromptInit.kind='from_string' needs PromptInit.text")
        return prompts.from_string(embedding, vocab, spec.text, sampled)
    if not spec.path:
        raise ValueError("PromptInit.kind='from_file' needs PromptInit.path (or PROMPT_FILE)")
    return prompts.from_file(spec.path)


def base_model_dir(model_dir: str) -> str:
    """Where a randomly initialised run keeps its frozen weights (an HF directory)."""
    return os.path.join(model_dir, "base_model")


def load_frozen(spec: ModelSpec, initial_checkpoint: str | None, model_dir: str | None,
                seed: int) -> tuple[T5Config, dict[str, Any]]:
    """(config, frozen params as host numpy arrays) for a run.

    With `initial_checkpoint` (HF directory, hub id or t5x checkpoint) the weights
    come from it and must match `spec.size`'s shapes. Without, they are random
    (tiny and pretraining runs) and saved once to `MODEL_DIR/base_model` so that a
    resumed run, eval and infer see the same weights.
    """
    config = spec.config()
    if initial_checkpoint:
        return load_checkpoint(initial_checkpoint, config)
    saved = base_model_dir(model_dir) if model_dir else None
    if saved and os.path.isdir(saved):
        return load_checkpoint(saved, config)
    from prompt_jax.t5.model import T5  # late: jax-heavy

    tokens = np.ones((1, 2), np.int32)
    params = jax.jit(lambda r: T5(config).init(r, tokens, tokens)["params"])(
        jax.random.PRNGKey(seed))
    params = jax.tree.map(np.asarray, flax_unbox(params))
    if saved and jax.process_index() == 0:
        save_hf(config, params, saved)
    return config, params


def flax_unbox(tree: Any) -> Any:
    import flax

    return flax.linen.unbox(tree)


def embedding_table(frozen: dict[str, Any]) -> np.ndarray:
    return np.asarray(flatten(frozen)["token_embedder/embedding"], dtype=np.float32)


def known_sizes() -> list[str]:
    return sorted(SIZES)


def place_params(model: Any, host_params: dict[str, Any], mesh: Any) -> dict[str, Any]:
    """Put a host parameter tree for `model` on `mesh`, sharded per the logical-axis rules
    (each device receives only its slice)."""
    from prompt_jax import partitioning

    tokens = np.ones((1, 2), np.int32)
    abstract = jax.eval_shape(lambda r: model.init(r, tokens, tokens)["params"],
                              jax.random.PRNGKey(0))
    return partitioning.shard_params(host_params, partitioning.params_shardings(mesh, abstract))


@gin.configurable
def demo_path(name: str = "") -> str:
    """A path inside the data bundled with the package (`prompt_jax/demo_data`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", name)
