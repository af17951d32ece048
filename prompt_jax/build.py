"""What a job builds before its loop: the model config, the frozen weights, the prompts.

Configurable from gin (the only gin-facing pieces besides the job functions):
`ModelSpec` (which T5, which dtypes) and `PromptInit` (how the prompt starts).
`load_frozen` is how every job gets its frozen model; `load_served` (eval, infer,
serve) adds the prompts it runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import gin
import jax
import numpy as np

from prompt_jax import model_dir as model_dir_lib
from prompt_jax import prompts
from prompt_jax.checkpoints import load_checkpoint, save_hf
from prompt_jax.checkpoints.tree import cast_params, check_params
from prompt_jax.pytree import flatten
from prompt_jax.t5.config import T5Config, get_config

PROMPT_INIT_KINDS = ("random_uniform", "reference_uniform", "sampled_vocab", "class_labels",
                     "from_string", "from_file")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which T5 and its numerics.

    `size` names a shape in `prompt_jax.t5.config.SIZES`. With an INITIAL_CHECKPOINT the
    checkpoint alone determines the architecture (`size` may stay None; when given, it is
    checked against the checkpoint); without one (a randomly initialised run) `size` is
    required. `param_dtype` is the dtype the frozen weights are held in (bfloat16 halves
    their memory); the prompt and its optimizer state are always float32.
    `remat_policy` (none | full | dots, `T5Config.remat_policy`) trades the backward pass's
    activation memory for recomputation; the numerics are the same under each.
    `dropout_impl` (packed | flax, `T5Config.dropout_impl`) is how dropout draws its masks:
    "packed" spends a quarter of the random bits; "flax" reproduces the dropout of runs made
    before it existed (resume such a run with it to continue the same stream).
    """

    size: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    dropout_rate: float = 0.1
    remat_policy: str = "none"
    dropout_impl: str = "packed"

    def numerics(self) -> dict[str, Any]:
        """What the spec sets whatever the architecture."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype,
                    dropout_rate=self.dropout_rate, remat_policy=self.remat_policy,
                    dropout_impl=self.dropout_impl)

    def config(self) -> T5Config:
        if self.size is None:
            raise ValueError("ModelSpec.size is not set and there is no INITIAL_CHECKPOINT to "
                             "take the architecture from: add a size gin file "
                             "(models/sizes/*.gin) or set INITIAL_CHECKPOINT")
        return get_config(self.size, **self.numerics())

    def resolve(self, found: T5Config, source: str) -> T5Config:
        """The run's config for a checkpoint whose architecture is `found`: its shapes, this
        spec's numerics; a `size`, when set, must agree (what shapes cannot tell, e.g. a t5x
        checkpoint's relative_attention_max_distance, is taken from the size)."""
        if self.size is None:
            return found.replace(**self.numerics())
        want = self.config()
        names = [f.name for f in dataclasses.fields(T5Config)
                 if f.name not in _NOT_FROM_CHECKPOINT and f.name != "scale_logits"]
        for name in names + ["logits_scaled"]:
            ours, theirs = getattr(want, name), getattr(found, name)
            if ours != theirs:
                raise ValueError(
                    f"{source}: the checkpoint has {name}={theirs!r}, but "
                    f"ModelSpec.size={self.size!r} has {name}={ours!r}; drop the size "
                    "gin file (INITIAL_CHECKPOINT determines the architecture) or pick the "
                    "checkpoint's size")
        return found.replace(**{n: getattr(want, n) for n in _NOT_FROM_CHECKPOINT})


# Fields a T5Config takes from the run (or the size) rather than from a checkpoint's shapes.
_NOT_FROM_CHECKPOINT = ("dtype", "param_dtype", "dropout_rate", "dropout_impl",
                        "remat_policy", "relative_attention_max_distance", "layer_norm_epsilon")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptInit:
    """How the prompt starts (the paper's ablation, Figure 3b).

    kind: random_uniform (the paper's U[-scale, scale]) | reference_uniform (the reference
    code's U[0, scale)) | sampled_vocab | class_labels | from_string | from_file (any prompt
    artifact).
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
    if spec.kind == "reference_uniform":
        return prompts.reference_uniform(spec.scale)
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


def load_frozen(spec: ModelSpec, initial_checkpoint: str | None, model_dir: str | None,
                seed: int) -> tuple[T5Config, dict[str, Any]]:
    """(config, frozen params as host numpy arrays, without any prompt) for a run.

    With `initial_checkpoint` (HF directory, hub id or t5x checkpoint) the weights and the
    architecture come from it (`ModelSpec.resolve`). Without, the weights are random
    (tiny and pretraining runs) and saved once to `MODEL_DIR/base_model` so that a
    resumed run, eval and infer see the same weights.
    """
    source = initial_checkpoint
    if not source and model_dir and os.path.isdir(model_dir_lib.path(model_dir,
                                                                    model_dir_lib.BASE_MODEL)):
        source = model_dir_lib.path(model_dir, model_dir_lib.BASE_MODEL)
    if source:
        found, params = load_checkpoint(source)
        config = spec.resolve(found, source)
        params = cast_params(params, config.weight_dtype)
        check_params(params, config, source)
        return config, params
    from prompt_jax.t5.model import T5  # late: jax-heavy

    config = spec.config()
    tokens = np.ones((1, 2), np.int32)
    params = jax.jit(lambda r: T5(config).init(r, tokens, tokens)["params"])(
        jax.random.PRNGKey(seed))
    params = jax.tree.map(np.asarray, flax.linen.unbox(params))
    if model_dir and jax.process_index() == 0:
        save_hf(config, params, model_dir_lib.path(model_dir, model_dir_lib.BASE_MODEL))
    return config, params


def embedding_table(frozen: dict[str, Any]) -> np.ndarray:
    """The table the encoder embeds input tokens with (prompt initialisation and nearest
    neighbours read it): the encoder's own when it has one, else the shared table."""
    flat = flatten(frozen)
    table = flat.get("encoder/token_embedder/embedding", flat["token_embedder/embedding"])
    return np.asarray(table, dtype=np.float32)


def place_params(config: T5Config, host_params: dict[str, Any], mesh: Any,
                 prompt_length: int = 0, model: Any = None) -> dict[str, Any]:
    """Put a host parameter tree of `T5(config, prompt_length)` (or of `model`) on `mesh`,
    sharded per the logical-axis rules (each device receives only its slice)."""
    from prompt_jax import partitioning
    from prompt_jax.t5.model import abstract_params

    abstract = abstract_params(config, prompt_length, boxed=True, model=model)
    return partitioning.shard_params(host_params, partitioning.params_shardings(mesh, abstract))


# ------------------------------------------------------------------ the model and its prompts


@dataclasses.dataclass
class Served:
    """A frozen model and named prompts for it (host arrays): what eval, infer and serve run."""

    config: T5Config
    frozen: dict[str, Any]
    prompts: dict[str, np.ndarray]  # name -> [P, E] float32, in the order given
    sources: dict[str, str]  # name -> the file each prompt came from
    # Key/value prefixes (methods/deep_prompts.py): (inference spec, matrix, P-tuning v2's
    # classification head or None), its file.
    deep_prompt: tuple[Any, np.ndarray, Any] | None = None
    deep_prompt_source: str | None = None

    def model(self, prompt_length: int = 0) -> Any:
        """The T5 that runs these: with the deep prompt's spec when there is one."""
        from prompt_jax.t5.model import T5

        spec = self.deep_prompt[0] if self.deep_prompt else None
        return T5(self.config, prompt_length=prompt_length, deep_prompt_spec=spec)

    def with_deep_prompt(self, flat_params: dict[str, Any]) -> dict[str, Any]:
        """`flat_params` (path -> array) plus the deep prompt's matrix (and head), if any."""
        from prompt_jax.methods import deep_prompts

        if not self.deep_prompt:
            return flat_params
        return deep_prompts.with_matrix(flat_params, *self.deep_prompt[1:])

    def head_task(self, task_name: str | None) -> bool:
        """Whether the deep prompt has a classification head; if so `task_name` must be a
        task with as many classes (a clear error naming the file otherwise)."""
        from prompt_jax.methods import deep_prompts

        if not self.deep_prompt or self.deep_prompt[2] is None:
            return False
        if not task_name:
            raise ValueError(f"{self.deep_prompt_source}: a classification head labels the "
                             "rows of one classification task; set MIXTURE_OR_TASK_NAME")
        deep_prompts.check_head_task(self.deep_prompt[0], task_name, self.deep_prompt_source)
        return True


def default_prompt_file(initial_checkpoint: str | None, model_dir: str | None) -> str | None:
    """The prompt a job runs when none is named: the one inside a prompt-tuned t5x
    INITIAL_CHECKPOINT (the reference's layout), else MODEL_DIR/best_prompt.npy."""
    from prompt_jax.checkpoints import prompt_artifacts

    if initial_checkpoint and prompt_artifacts.holds_prompt(initial_checkpoint):
        return initial_checkpoint
    if not model_dir:
        return None
    best = model_dir_lib.path(model_dir, model_dir_lib.BEST_PROMPT)
    return best if os.path.exists(best) else None


def default_deep_prompt_file(model_dir: str | None) -> str | None:
    """MODEL_DIR/best_deep_prompt.npz when the run wrote one (P-tuning v2, prefix tuning)."""
    if not model_dir:
        return None
    best = model_dir_lib.path(model_dir, model_dir_lib.BEST_DEEP_PROMPT)
    return best if os.path.exists(best) else None


def deep_prompt_files(named: Mapping[str, str]) -> dict[str, str]:
    """{name: path} of the deep prompts among named prompt files; more than one is an error
    (a model runs at most one)."""
    from prompt_jax.methods import deep_prompts

    deep = {name: p for name, p in named.items() if deep_prompts.is_deep_prompt_artifact(p)}
    if len(deep) > 1:
        raise ValueError(f"{len(deep)} deep prompts ({', '.join(deep.values())}); a model "
                         "runs at most one")
    return deep


def load_served(spec: ModelSpec, initial_checkpoint: str | None, model_dir: str | None,
                prompt_files: Mapping[str, str] | Sequence[str] | None, seed: int = 0
                ) -> Served:
    """The frozen model and its prompts, each checked against the model's d_model.

    `prompt_files`: {name: path}, or paths (named `prompt_0`, ...); each any artifact
    `checkpoints.prompt_artifacts` reads (.npy, PEFT adapter, prompt-tuned t5x checkpoint).
    None or empty: `default_prompt_file`, or no prompt. At most one of them may be a deep
    prompt (a deep prompt .npz or a PEFT PREFIX_TUNING adapter; by default
    MODEL_DIR/best_deep_prompt.npz when it exists): `Served.deep_prompt`.
    """
    from prompt_jax.methods import deep_prompts

    config, frozen = load_frozen(spec, initial_checkpoint, model_dir, seed)
    if isinstance(prompt_files, Mapping):
        named = dict(prompt_files)
    else:
        files = list(prompt_files or [])
        if not files and (default := default_prompt_file(initial_checkpoint, model_dir)):
            files = [default]
        named = {f"prompt_{i}": f for i, f in enumerate(files)}
    deep = deep_prompt_files(named)
    deep_source = next(iter(deep.values()), None)
    if deep_source is None and not prompt_files:
        deep_source = default_deep_prompt_file(model_dir)
    named = {name: p for name, p in named.items() if name not in deep}
    loaded = {name: load_prompt_for(path, config) for name, path in named.items()}
    return Served(config, frozen, loaded, named,
                  deep_prompts.load_deep_prompt_artifact(deep_source, config)
                  if deep_source else None, deep_source)


def load_prompt_for(path: str, config: T5Config) -> np.ndarray:
    """A prompt artifact for a model of `config`: float32 [P, d_model], or a ValueError
    naming the file, the expected and the found shape."""
    from prompt_jax.checkpoints.prompt_artifacts import load_prompt_artifact

    return load_prompt_artifact(path, config.d_model)


@gin.configurable
def demo_path(name: str = "") -> str:
    """A path inside the data bundled with the package (`prompt_jax/demo_data`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_data", name)
