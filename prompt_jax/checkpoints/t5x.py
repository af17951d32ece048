"""t5x checkpoints as t5x writes them: a msgpack `checkpoint` file whose leaves are
either small inlined arrays or tensorstore specs of zarr arrays beside it.

Only `optimizer/target` (the parameters) is read; the optimizer state is
ignored. The config is inferred from the shapes (`relative_attention_max_distance`,
dropout and dtypes cannot be, and come from the `config` argument if given).
Works on local directories and on `gs://` paths (tensorstore's gcs driver).

A checkpoint written by the prompt-tuning reference also holds its prompt variables
(anything under `encoder/prompt/` or `decoder/prompt/`): `load_t5x` leaves them out,
so the frozen tree is always that of the model without a prompt, and `t5x_prompts`
reads them. The reference's layouts:

- one prompt: `target/encoder/prompt/prompt/prompt` [P, E] (its `PromptEncoder`'s
  `prompt` module wraps a `Prompt` module named `prompt` whose parameter is `prompt`;
  our own model names it `encoder/prompt/prompt`, which is read too);
- multi-task (`prompt_tuning/extended/multitask_prompts.py`): `.../prompt/shared_prompt`
  [P_s, H_s] and `.../prompt/task_prompts/embedding` [N, S], one row per task, combined
  with the shared prompt by the run's `*MultiTaskPrompt` class (see `COMBINE_MODES`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from typing import Any

import numpy as np

from prompt_jax.checkpoints.tree import PROMPT_PATH, check_params
from prompt_jax.pytree import unflatten
from prompt_jax.t5.config import T5Config

log = logging.getLogger(__name__)
PROMPT_SCOPES = ("encoder/prompt/", "decoder/prompt/")
REFERENCE_PROMPT = "encoder/prompt/prompt/prompt"
SHARED_PROMPT = "encoder/prompt/prompt/shared_prompt"
TASK_PROMPTS = "encoder/prompt/prompt/task_prompts/embedding"


def _kvstore(directory: str) -> dict[str, Any]:
    if directory.startswith("gs://"):
        bucket, _, path = directory[len("gs://"):].partition("/")
        return {"driver": "gcs", "bucket": bucket, "path": path.rstrip("/") + "/"}
    return {"driver": "file", "path": os.path.abspath(directory) + "/"}


def _read_file(directory: str, name: str) -> bytes:
    if not directory.startswith("gs://"):
        with open(os.path.join(directory, name), "rb") as f:
            return f.read()
    import tensorstore as ts

    result = ts.KvStore.open(_kvstore(directory)).result().read(name).result()
    if result.state != "value":
        raise FileNotFoundError(f"{directory}/{name}: not found")
    return bytes(result.value)


def is_t5x_checkpoint(path: str) -> bool:
    return (path.startswith("gs://") and not path.endswith(".json")) or os.path.isfile(
        os.path.join(path, "checkpoint"))


def latest_step_dir(model_dir: str) -> str | None:
    """The `checkpoint_<N>` subdirectory with the largest N, if any."""
    if not os.path.isdir(model_dir):
        return None
    steps = [int(m.group(1)) for d in os.listdir(model_dir)
             if (m := re.fullmatch(r"checkpoint_(\d+)", d))
             and os.path.isfile(os.path.join(model_dir, d, "checkpoint"))]
    return os.path.join(model_dir, f"checkpoint_{max(steps)}") if steps else None


def _read_array(directory: str, name: str, spec: dict[str, Any]) -> np.ndarray:
    import tensorstore as ts

    rel = spec.get("kvstore", {}).get("path")
    if spec.get("driver") != "zarr" or not rel:
        raise ValueError(f"{directory}/checkpoint: parameter {name} has an unsupported "
                         f"tensorstore spec {spec}")
    kv = _kvstore(directory)
    kv["path"] = kv["path"] + rel.rstrip("/") + "/"
    try:
        store = ts.open({"driver": "zarr", "kvstore": kv}, open=True, read=True).result()
        array = store.read().result()
    except Exception as e:  # tensorstore reports missing/corrupt chunks as ValueError etc.
        raise ValueError(f"{directory}/{rel}: cannot read parameter {name}: {e}") from None
    shape = tuple(spec.get("metadata", {}).get("shape", array.shape))
    if tuple(array.shape) != shape:
        raise ValueError(f"{directory}/{rel}: parameter {name} has shape {array.shape}, the "
                         f"checkpoint index says {shape}")
    return np.asarray(array)


def infer_config(flat: dict[str, np.ndarray], source: str) -> T5Config:
    """T5Config from parameter shapes."""

    def shape(name):
        if name not in flat:
            raise ValueError(f"{source}: parameter {name} missing; cannot infer the model")
        return np.shape(flat[name])

    vocab, d_model = shape("token_embedder/embedding")
    joined = shape("encoder/layers_0/attention/query/kernel")[1]
    heads, buckets = shape("encoder/relpos_bias/rel_embedding")
    gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
    d_ff = shape("encoder/layers_0/mlp/" + ("wi_0" if gated else "wi") + "/kernel")[1]

    def count(stack):
        return 1 + max(int(m.group(1)) for k in flat
                       if (m := re.match(rf"{stack}/layers_(\d+)/", k)))

    if joined % heads:
        raise ValueError(f"{source}: query kernel width {joined} is not a multiple of the "
                         f"{heads} heads of the relative position table")
    return T5Config(vocab_size=vocab, d_model=d_model, d_kv=joined // heads, d_ff=d_ff,
                    num_heads=heads, num_encoder_layers=count("encoder"),
                    num_decoder_layers=count("decoder"), relative_attention_num_buckets=buckets,
                    gated_gelu=gated, tie_embeddings="decoder/logits_dense/kernel" not in flat)


def resolve_checkpoint(path: str) -> str:
    """A t5x `checkpoint_<N>` directory from it, its `checkpoint` file, or a model directory
    of them (the latest step)."""
    path = os.fspath(path).rstrip("/")
    if not path.startswith("gs://"):
        if os.path.isfile(path) and os.path.basename(path) == "checkpoint":
            return os.path.dirname(path) or "."
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: t5x checkpoint path does not exist")
    if is_t5x_checkpoint(path):
        return path
    latest = latest_step_dir(path)
    if latest:
        return latest
    raise FileNotFoundError(f"{path}: not a t5x checkpoint (expected a checkpoint_<N> directory "
                            "with a 'checkpoint' file, or a directory of those)")


def _read_target(directory: str) -> dict[str, Any]:
    """The `optimizer/target` leaves, flat: inlined arrays, or tensorstore specs (dicts)."""
    from flax import serialization

    try:
        state = serialization.msgpack_restore(_read_file(directory, "checkpoint"))
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{directory}/checkpoint: not a t5x msgpack checkpoint ({e})") from None
    target = state.get("optimizer", {}).get("target") if isinstance(state, dict) else None
    if not isinstance(target, dict):
        raise ValueError(f"{directory}/checkpoint: no 'optimizer/target' parameter tree "
                         f"(top-level keys: {sorted(state) if isinstance(state, dict) else '?'})")

    # A tensorstore spec is a dict holding 'driver'; flatten stops there.
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and "driver" not in node:
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            flat[prefix] = node

    walk(target, "")
    return flat


def _value(directory: str, name: str, leaf: Any) -> np.ndarray:
    return _read_array(directory, name, leaf) if isinstance(leaf, dict) else np.asarray(leaf)


def _shape(leaf: Any) -> tuple[int, ...]:
    if isinstance(leaf, dict):
        return tuple(leaf.get("metadata", {}).get("shape", ()))
    return tuple(np.shape(leaf))


def is_prompt_variable(name: str) -> bool:
    """Whether a target path (`encoder/prompt/prompt/prompt`, ...) belongs to a prompt."""
    return name.startswith(PROMPT_SCOPES)


def load_t5x(directory: str, config: T5Config | None = None
             ) -> tuple[T5Config, dict[str, Any]]:
    """Read a t5x `checkpoint_<N>` directory -> (config, frozen params as numpy arrays).

    Prompt variables are left out (read them with `t5x_prompts`): the tree is always
    that of `T5(config)` without a prompt.
    """
    directory = directory.rstrip("/")
    leaves = _read_target(directory)
    prompts = sorted(k for k in leaves if is_prompt_variable(k))
    if prompts:
        log.info("%s: prompt variables %s are not part of the frozen model (t5x_prompts "
                 "reads them)", directory, prompts)
    arrays = {name: _value(directory, name, leaf) for name, leaf in leaves.items()
              if not is_prompt_variable(name)}
    found = config or infer_config(arrays, directory)
    check_params(unflatten(arrays), found, directory)
    if config is not None:
        arrays = {k: v.astype(config.weight_dtype) for k, v in arrays.items()}
    return found, unflatten(arrays)


def _combine_add(shared: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    length, size = shared.shape
    return shared[None] + tasks.reshape(-1, length, size)


def _combine_concat(shared: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    size = shared.shape[1]
    tasks = tasks.reshape(tasks.shape[0], -1, size)
    return np.concatenate([np.broadcast_to(shared, (len(tasks),) + shared.shape), tasks], 1)


def _combine_concat_features(shared: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    length = shared.shape[0]
    tasks = tasks.reshape(tasks.shape[0], length, -1)
    return np.concatenate([np.broadcast_to(shared, (len(tasks),) + shared.shape), tasks], 2)


def _combine_project(shared: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    # Each task row is a flattened affine map [H_t, H_s] (row-major) and its bias [H_t].
    size = shared.shape[1]
    out = tasks.shape[1] // (size + 1)
    kernel = tasks[:, : out * size].reshape(-1, out, size)
    return np.einsum("ps,nts->npt", shared, kernel) + tasks[:, None, out * size:]


# The reference's `*MultiTaskPrompt` classes: (combination, task row size S from P_s, H_s, E).
COMBINE_MODES = {
    "add": (_combine_add, lambda p, h, e: p * h),  # AddMultiTaskPrompt: [P, E] each
    "concat": (_combine_concat, None),  # ConcatMultiTaskPrompt: [P_s + P_t, E]
    "concat_features": (_combine_concat_features, None),  # ConcatFeatures...: [P, H_s + H_t]
    "project": (_combine_project, lambda p, h, e: h * e + e),  # ProjectMultiTaskPrompt
}
_GIN_CLASSES = {"Add": "add", "Concat": "concat", "ConcatFeatures": "concat_features",
                "Project": "project"}


def _gin_combine(directory: str) -> tuple[str | None, str]:
    """The combine mode the run's config.gin (t5x writes it to the model directory) names."""
    model_dir = os.path.dirname(directory)
    try:
        text = _read_file(model_dir, "config.gin").decode("utf-8", "replace")
    except (OSError, FileNotFoundError):
        return None, f"no {model_dir}/config.gin"
    found = sorted({_GIN_CLASSES[m] for m in
                    re.findall(r"\b(Add|Concat|ConcatFeatures|Project)MultiTaskPrompt\b", text)})
    if len(found) == 1:
        return found[0], ""
    return None, f"{model_dir}/config.gin names {found or 'no *MultiTaskPrompt class'}"


def _multitask(directory: str, shared: np.ndarray, tasks: np.ndarray, width: int | None,
               combine: str | None) -> dict[str, np.ndarray]:
    source = f"{directory}/checkpoint"
    if combine is None:
        combine, why = _gin_combine(directory)
        if combine is None:
            raise ValueError(f"{source}: a multi-task prompt (shared_prompt {shared.shape}, "
                             f"task_prompts {tasks.shape}) whose combine mode is unknown ({why})"
                             f"; pass combine= one of {', '.join(COMBINE_MODES)}")
    if combine not in COMBINE_MODES:
        raise ValueError(f"{source}: combine={combine!r}, expected one of "
                         f"{', '.join(COMBINE_MODES)}")
    if shared.ndim != 2 or tasks.ndim != 2:
        raise ValueError(f"{source}: shared_prompt {shared.shape} and task_prompts "
                         f"{tasks.shape} must both be 2-D")
    fn, task_size = COMBINE_MODES[combine]
    try:
        prompts = fn(shared, tasks)
    except ValueError:
        prompts = None
    expected = task_size(*shared.shape, width) if task_size and width else tasks.shape[1]
    if prompts is None or tasks.shape[1] != expected or (width and prompts.shape[2] != width):
        raise ValueError(f"{source}: shared_prompt {shared.shape} and task_prompts "
                         f"{tasks.shape} do not combine by {combine!r} into prompts of width "
                         f"{width or 'E'}")
    return {f"task_{i}": p.astype(np.float32) for i, p in enumerate(prompts)}


def prompt_variables(path: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(the `checkpoint_<N>` directory, {prompt variable: shape}) without reading arrays."""
    directory = resolve_checkpoint(path)
    return directory, {k: _shape(v) for k, v in sorted(_read_target(directory).items())
                       if is_prompt_variable(k)}


def t5x_prompts(path: str, combine: str | None = None) -> dict[str, np.ndarray]:
    """The prompts of a prompt-tuned t5x checkpoint -> {name: float32 [P, E]}; {} if none.

    A single prompt is `{'prompt': [P, E]}`. A multi-task checkpoint gives
    `{'task_<i>': [P, E]}`, task i's shared and task prompts combined as the
    reference does (`combine`: add, concat, concat_features or project; read from the
    run's config.gin when not given). The reference cuts each multi-task input's first
    token (task i's sentinel `<extra_id_i>`) before prepending the prompt: serve these
    prompts on inputs without it. Raises ValueError naming the checkpoint for other
    prompt layouts (decoder prompts, ...), a prompt whose width is not the checkpoint's
    d_model, and NaN/inf.
    """
    directory = resolve_checkpoint(path)
    leaves = _read_target(directory)
    names = sorted(k for k in leaves if is_prompt_variable(k))
    embedding = leaves.get("token_embedder/embedding")
    width = _shape(embedding)[-1] if embedding is not None else None
    source = f"{directory}/checkpoint"
    if not names:
        return {}
    if names in ([REFERENCE_PROMPT], [PROMPT_PATH]):
        prompt = _value(directory, names[0], leaves[names[0]]).astype(np.float32)
        if prompt.ndim != 2 or (width and prompt.shape[1] != width):
            raise ValueError(f"{source}: target/{names[0]} has shape {prompt.shape}, expected "
                             f"[P, {width or 'E'}] (d_model of token_embedder/embedding)")
        found = {"prompt": prompt}
    elif names == sorted([SHARED_PROMPT, TASK_PROMPTS]):
        found = _multitask(directory, _value(directory, SHARED_PROMPT, leaves[SHARED_PROMPT]),
                           _value(directory, TASK_PROMPTS, leaves[TASK_PROMPTS]), width,
                           combine)
    else:
        raise ValueError(f"{source}: prompt variables {['target/' + n for n in names]} are not "
                         f"a layout prompt_jax reads; supported: one prompt at "
                         f"target/{REFERENCE_PROMPT}, or a multi-task target/{SHARED_PROMPT} + "
                         f"target/{TASK_PROMPTS}")
    for name, prompt in found.items():
        if not np.isfinite(prompt).all():
            raise ValueError(f"{source}: prompt {name} holds "
                             f"{int(prompt.size - np.isfinite(prompt).sum())} NaN/inf values")
    return found


def extract_variable(checkpoint: str, variable: str = "target/" + REFERENCE_PROMPT,
                     dtype: Any = np.float32) -> np.ndarray:
    """One variable of a t5x checkpoint's target, as the reference's `extract_variable`
    script reads it (`/`-scoped; a leading `/` or `target/` is optional) -> array cast to
    `dtype` (None: as stored). Raises ValueError naming the checkpoint and the closest
    variable names when `variable` is not there.
    """
    directory = resolve_checkpoint(checkpoint)
    leaves = _read_target(directory)
    name = re.sub(r"^target/", "", variable.strip("/"))
    if name not in leaves:
        inside = sorted(k for k in leaves if k.startswith(name + "/"))
        if inside:
            raise ValueError(f"{directory}/checkpoint: target/{name} is a scope, not a "
                             f"variable; it holds {', '.join('target/' + k for k in inside[:5])}"
                             + (f" and {len(inside) - 5} more" if len(inside) > 5 else ""))
        close = difflib.get_close_matches(name, list(leaves), n=5, cutoff=0.6)
        raise ValueError(f"{directory}/checkpoint: no variable target/{name}; closest: "
                         f"{', '.join('target/' + c for c in close) or 'none'} "
                         f"({len(leaves)} variables in all)")
    value = _value(directory, name, leaves[name])
    return value if dtype is None else value.astype(dtype)


def checkpoint_step(checkpoint: str) -> int:
    """The train step a t5x checkpoint was saved at (`optimizer/state/step`)."""
    from flax import serialization

    directory = resolve_checkpoint(checkpoint)
    state = serialization.msgpack_restore(_read_file(directory, "checkpoint"))
    try:
        return int(np.asarray(state["optimizer"]["state"]["step"]))
    except (KeyError, TypeError):
        raise ValueError(f"{directory}/checkpoint: no optimizer/state/step") from None
