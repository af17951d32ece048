"""The soft prompt `[P, E]`, its initializers, and prompt files.

Initializers follow the reference repository's API, `init(rng, shape) -> [P, E]`,
and close over what they need (the frozen embedding table, a vocabulary) as plain
arguments:

- `random_uniform(scale)`: uniform in [-scale, scale] (the paper's ablation; 0.5);
- `reference_uniform(scale)`: uniform in [0, scale), what the reference code draws;
- `sampled_vocab(embedding, population_size)`: rows of the embedding table, ids drawn
  without replacement among the first N (5,000: SentencePiece ids are ordered by
  frequency), with replacement only when P > N;
- `class_labels(embedding, vocab, labels, fallback)`: row i is the mean embedding of
  label i's sub-tokens, the remaining rows come from `fallback` (sampled vocab by
  default, as in the paper);
- `from_string(embedding, vocab, text, fallback)`: row i is the embedding of the
  text's i-th token, the remaining rows from `fallback`;
- `from_file(path)`: a released or saved `.npy` prompt (shape, dtype and values checked).

Prompt files are `.npy`, `[P, E]` float32: the format of the released prompts
(bfloat16 and float16 files are read too). `save_peft` / `load_peft` write and read
Hugging Face PEFT prompt adapters (`checkpoints/peft.py`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from prompt_jax.t5.config import T5Config

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...]], Array]
PROMPT_AXES = ("prompt", "prompt_embed")
log = logging.getLogger(__name__)  # replicated on every mesh (partitioning.py)


class Vocabulary(Protocol):
    def encode(self, s: str) -> Sequence[int]: ...


def random_uniform(scale: float = 0.5) -> Initializer:
    """Uniform in [-scale, scale]."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(rng, shape, dtype, minval=-scale, maxval=scale)

    return init


def reference_uniform(scale: float = 0.5) -> Initializer:
    """Uniform in [0, scale): what the reference code draws (flax `uniform(scale)`) for the
    paper's "random uniform [-0.5, 0.5]" (`random_uniform`)."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(rng, shape, dtype, minval=0.0, maxval=scale)

    return init


def _check_width(embedding: np.ndarray, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or embedding.shape[-1] != shape[-1]:
        raise ValueError(f"{what}: the embedding table is {tuple(embedding.shape)}, "
                         f"which cannot fill a prompt of shape {tuple(shape)}")


def sampled_vocab(embedding: np.ndarray, population_size: int = 5000) -> Initializer:
    """Rows of `embedding` [V, E] with ids drawn among the first `population_size`."""
    if population_size <= 0:
        raise ValueError(f"sampled_vocab: population_size must be positive, got "
                         f"{population_size}")
    embedding = np.asarray(embedding)
    population = min(population_size, embedding.shape[0])

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        _check_width(embedding, shape, "sampled_vocab")
        ids = np.asarray(jax.random.choice(rng, population, (shape[0],),
                                           replace=shape[0] > population))
        return jnp.asarray(embedding[ids], dtype)

    return init


def _fill(rows: Sequence[np.ndarray], fallback: Initializer, rng: jax.Array,
          shape: tuple[int, ...], dtype, what: str) -> Array:
    if len(rows) > shape[0]:  # as the reference: keep the first P, say what was dropped
        log.warning("%s: %d rows for a prompt of %d positions; the last %d are not used",
                    what, len(rows), shape[0], len(rows) - shape[0])
        rows = rows[: shape[0]]
    prompt = np.array(fallback(rng, shape), dtype=np.float32)
    if rows:
        prompt[: len(rows)] = np.stack(rows)
    return jnp.asarray(prompt, dtype)


def class_labels(embedding: np.ndarray, vocab: Vocabulary, labels: Sequence[str],
                 fallback: Initializer | None = None) -> Initializer:
    """Row i = mean embedding of `labels[i]`'s sub-tokens; other rows from `fallback`."""
    embedding = np.asarray(embedding)
    if not labels:
        raise ValueError("class_labels: no label strings given")
    fallback = fallback or sampled_vocab(embedding)

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        _check_width(embedding, shape, "class_labels")
        rows = []
        for label in labels:
            ids = list(vocab.encode(label))
            if not ids:
                raise ValueError(f"class_labels: label {label!r} tokenizes to nothing")
            rows.append(embedding[ids].astype(np.float32).mean(axis=0))
        return _fill(rows, fallback, rng, shape, dtype, "class_labels")

    return init


def from_string(embedding: np.ndarray, vocab: Vocabulary, text: str,
                fallback: Initializer | None = None) -> Initializer:
    """Row i = embedding of the i-th token of `text`; other rows from `fallback`."""
    embedding = np.asarray(embedding)
    fallback = fallback or sampled_vocab(embedding)

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        _check_width(embedding, shape, "from_string")
        ids = list(vocab.encode(text))
        rows = [embedding[i].astype(np.float32) for i in ids]
        return _fill(rows, fallback, rng, shape, dtype, f"from_string({text!r})")

    return init


def from_file(path: str) -> Initializer:
    """The prompt in `path` — a `.npy`, a PEFT adapter or a prompt-tuned t5x checkpoint
    (`checkpoints.prompt_artifacts`) — checked against the requested shape."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        del rng
        from prompt_jax.checkpoints.prompt_artifacts import load_prompt_artifact

        prompt = load_prompt_artifact(path)
        if tuple(prompt.shape) != tuple(shape):
            raise ValueError(f"{path}: prompt has shape {tuple(prompt.shape)}, expected "
                             f"{tuple(shape)} (PROMPT_LENGTH x d_model)")
        return jnp.asarray(prompt, dtype)

    return init


def load_prompt(path: str, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a `.npy` prompt -> float32 [P, E]; never unpickles.

    float32, float16, float64 and bfloat16 files are read. A bfloat16 `.npy` (what
    the reference's `extract_variable --restore_dtype=bfloat16` writes) records its
    dtype as the 2-byte void `|V2`, since numpy has no bfloat16 of its own; it is read
    as ml_dtypes' bfloat16, the only 2-byte float with that descriptor.

    Raises ValueError naming the file for: not a .npy file, a pickled/object array,
    a non-float dtype, not 2-D, a shape other than `expected_shape`, NaN or inf.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: prompt file does not exist")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path}: not a .npy file (no NumPy header); prompt files are "
                             "float32 .npy arrays [P, E]")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{path}: holds a pickled (object) array; prompt files must be "
                             "plain float .npy arrays [P, E], and prompt_jax never unpickles"
                             ) from None
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npy file ({e})") from None
    if array.dtype.kind == "V" and array.dtype.itemsize == 2 and array.dtype.names is None:
        import ml_dtypes

        array = array.view(ml_dtypes.bfloat16)
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: prompt has dtype {array.dtype}, expected a float array "
                         "(float32, bfloat16 or float16)")
    if array.ndim != 2:
        raise ValueError(f"{path}: prompt has shape {array.shape}, expected [P, E]"
                         + (f" = {tuple(expected_shape)}" if expected_shape else ""))
    if expected_shape is not None and tuple(array.shape) != tuple(expected_shape):
        raise ValueError(f"{path}: prompt has shape {tuple(array.shape)}, expected "
                         f"{tuple(expected_shape)} (PROMPT_LENGTH x d_model)")
    with np.errstate(over="ignore"):  # float64 beyond float32's range: inf, refused below
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"{path}: prompt holds {bad} NaN/inf values (as float32)")
    return array


def save_prompt(path: str, prompt: np.ndarray) -> None:
    """Write `prompt` [P, E] as float32 `.npy`, atomically (a crash leaves the old file)."""
    prompt = np.asarray(prompt, dtype=np.float32)
    if prompt.ndim != 2:
        raise ValueError(f"{path}: refusing to save a prompt of shape {prompt.shape}, "
                         "expected [P, E]")
    from prompt_jax.files import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a name
            np.save(f, prompt, allow_pickle=False)

    write_atomically(path, write)


# PEFT adapters (`prompt_jax.checkpoints.peft`), imported late: the checkpoint readers
# import the model, which imports this module.
def save_peft(prompt: np.ndarray, directory: str, base_model_name_or_path: str | None = None,
              *, config: T5Config | None = None) -> None:
    """Write `prompt` [P, E] as a PEFT PROMPT_TUNING adapter (see checkpoints.peft.save_peft)."""
    from prompt_jax.checkpoints import peft

    peft.save_peft(prompt, directory, base_model_name_or_path, config=config)


def load_peft(directory: str, d_model: int | None = None) -> np.ndarray:
    """A PEFT PROMPT_TUNING / P_TUNING adapter's encoder prompt -> float32 [P, E]
    (see checkpoints.peft.load_peft)."""
    from prompt_jax.checkpoints import peft

    return peft.load_peft(directory, d_model)


class Prompt(nn.Module):
    """A learned `[P, E]` matrix (param `prompt`, logical axes `('prompt', 'prompt_embed')`).

    Kept in float32 whatever the frozen weights' dtype; the encoder casts it to
    the activation dtype where it is prepended.
    """

    length: int
    embed_dim: int
    init: Initializer = random_uniform()

    @nn.compact
    def __call__(self) -> Array:
        """-> [P, E]."""
        return self.param("prompt", nn.with_logical_partitioning(self.init, PROMPT_AXES),
                          (self.length, self.embed_dim))
