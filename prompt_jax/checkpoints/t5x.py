"""t5x checkpoints as t5x writes them: a msgpack `checkpoint` file whose leaves are
either small inlined arrays or tensorstore specs of zarr arrays beside it.

Only `optimizer/target` (the parameters) is read; the optimizer state is
ignored. The config is inferred from the shapes (`relative_attention_max_distance`,
dropout and dtypes cannot be, and come from the `config` argument if given).
Works on local directories and on `gs://` paths (tensorstore's gcs driver).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from prompt_jax.checkpoints.tree import PROMPT_PATH, check_params
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.config import T5Config


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


def load_t5x(directory: str, config: T5Config | None = None
             ) -> tuple[T5Config, dict[str, Any]]:
    """Read a t5x `checkpoint_<N>` directory -> (config, params as numpy arrays)."""
    from flax import serialization

    directory = directory.rstrip("/")
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
    arrays = {name: _read_array(directory, name, leaf) if isinstance(leaf, dict)
              else np.asarray(leaf) for name, leaf in flat.items()}
    prompt = [k for k in arrays if k.startswith("encoder/prompt/")]
    if len(prompt) == 1:  # a prompt-tuned checkpoint: keep its prompt under our name
        arrays[PROMPT_PATH] = arrays.pop(prompt[0])

    found = config or infer_config(arrays, directory)
    prompt_length = arrays[PROMPT_PATH].shape[0] if PROMPT_PATH in arrays else 0
    params = unflatten(arrays)
    check_params(params, found, directory, prompt_length)
    if config is not None:
        params = unflatten({k: v.astype(config.weight_dtype) if k != PROMPT_PATH else v
                            for k, v in flatten(params).items()})
    return found, params
