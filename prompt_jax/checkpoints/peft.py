"""Hugging Face PEFT prompt adapters <-> prompts `[P, E]`.

A PEFT adapter directory holds `adapter_config.json` and `adapter_model.safetensors`.
For PROMPT_TUNING and P_TUNING the safetensors file holds one tensor,
`prompt_embeddings` `[num_virtual_tokens * num_transformer_submodules, token_dim]`.
For P_TUNING it is the prompt encoder's (MLP/LSTM) output at save time (PEFT's
`get_prompt_embedding_to_save`; a loaded adapter uses the rows as they are), so both
types are plain prompts. PEFT's seq2seq forward and generate prepend rows
`[:num_virtual_tokens]` to the encoder's input embeddings and use no other row: with
`num_transformer_submodules=2` (PEFT's default for SEQ_2_SEQ_LM) the second block is
saved but unused by these two types. Those first rows are the prompt.

PREFIX_TUNING adapters hold per-layer key/value prefixes, `prompt_embeddings`
`[num_virtual_tokens, num_layers * 2 * token_dim]` (with `prefix_projection`, the
projection's output); `load_peft_prefix` / `save_peft_prefix` read and write them as
prompt_jax's prefix_tuning deep prompt (methods/deep_prompts.py says where PEFT puts them).

Pickled `adapter_model.bin` files are refused, never unpickled. bfloat16 and float16
tensors are read (safetensors' numpy reader has no bfloat16, so the file is parsed
here: an 8-byte little-endian header size, a JSON header, the raw data).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from prompt_jax.files import write_atomically
from prompt_jax.t5.config import T5Config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_TENSOR = "prompt_embeddings"  # PEFT's name for a prompt-learning adapter's weights
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING")
TASK_TYPE = "SEQ_2_SEQ_LM"
_WHY_NOT = {
    "PREFIX_TUNING": "prefix tuning adapters hold per-layer attention keys/values, not an "
                     "input prompt; they load as a deep prompt (load_peft_prefix), not as a "
                     "prompt [P, E]",
    "MULTITASK_PROMPT_TUNING": "multi-task prompt tuning adapters (a shared prompt times "
                               "per-task factors) are not supported",
}


def is_peft_adapter(path: str) -> bool:
    """Whether `path` is a directory holding a PEFT `adapter_config.json`."""
    return os.path.isfile(os.path.join(os.fspath(path), ADAPTER_CONFIG))


def _model_sizes(base_model_name_or_path: str | None, config: T5Config | None
                 ) -> tuple[int | None, int | None, int | None, str]:
    """(d_model, num_layers, num_attention_heads, source) as PEFT reads them from the model
    (`num_hidden_layers` is T5's `num_layers`, the encoder's depth); Nones when unknown,
    which PEFT fills from the base model when it loads the adapter."""
    if config is not None:
        return config.d_model, config.num_encoder_layers, config.num_heads, "config"
    hf_config = os.path.join(base_model_name_or_path or "", "config.json")
    if base_model_name_or_path and os.path.isfile(hf_config):
        try:
            with open(hf_config) as f:
                found = json.load(f)
        except ValueError as e:
            raise ValueError(f"{hf_config}: not valid JSON ({e})") from None
        return found.get("d_model"), found.get("num_layers"), found.get("num_heads"), hf_config
    return None, None, None, ""


def save_peft(prompt: np.ndarray, directory: str, base_model_name_or_path: str | None = None,
              *, config: T5Config | None = None) -> None:
    """Write `prompt` [P, E] as a PEFT PROMPT_TUNING adapter for a seq2seq T5.

    `PeftModel.from_pretrained(t5, directory)` then prepends `prompt` to the encoder's
    input, as prompt_jax does. `num_layers` / `num_attention_heads` are written as PEFT
    writes them when known: from `config`, else from `base_model_name_or_path`'s
    `config.json` when that is a local Hugging Face directory (PEFT fills them from the
    base model otherwise). Raises ValueError naming `directory` for a prompt that is not
    2-D, holds NaN/inf, or whose width is not the model's d_model.
    """
    directory = os.fspath(directory)
    prompt = np.asarray(prompt, dtype=np.float32)
    if prompt.ndim != 2:
        raise ValueError(f"{directory}: refusing to save a prompt of shape {prompt.shape}, "
                         "expected [P, E]")
    if not np.isfinite(prompt).all():
        raise ValueError(f"{directory}: refusing to save a prompt holding "
                         f"{int(prompt.size - np.isfinite(prompt).sum())} NaN/inf values")
    d_model, num_layers, num_heads, source = _model_sizes(base_model_name_or_path, config)
    if d_model is not None and prompt.shape[1] != d_model:
        raise ValueError(f"{directory}: prompt has shape {prompt.shape}, expected "
                         f"[P, {d_model}] (d_model of {source})")
    adapter_config = {  # the fields PEFT 0.21 writes for PromptTuningConfig, less peft_version
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": int(prompt.shape[0]),
        "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": TASK_TYPE,
        "token_dim": int(prompt.shape[1]),
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    _write_adapter(directory, adapter_config, prompt)


def _write_adapter(directory: str, adapter_config: dict[str, Any], weights: np.ndarray) -> None:
    """adapter_model.safetensors (PEFT's one tensor) and adapter_config.json, each atomically."""
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomically(os.path.join(directory, ADAPTER_WEIGHTS),
                      lambda path: save_file({PROMPT_TENSOR: np.ascontiguousarray(weights)},
                                             path, metadata={"format": "pt"}))
    write_atomically(os.path.join(directory, ADAPTER_CONFIG), write_config)


def read_adapter_config(directory: str) -> tuple[dict[str, Any], str]:
    """(adapter_config.json as a dict, its path); raises naming the file."""
    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: PEFT adapter directory does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a PEFT adapter directory holds "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        with open(path) as f:
            found = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path}: holds a {type(found).__name__}, expected a JSON object")
    return found, path


def _positive_int(config: dict[str, Any], field: str, path: str) -> int:
    value = config.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{path}: field {field} is {value!r}, expected a positive integer")
    return value


def _adapter_tensor(directory: str, expected: tuple[int, int], why: str) -> np.ndarray:
    """The adapter's one tensor (safetensors only), float32, of shape `expected` (`why`: the
    config fields that make it) and finite; raises naming the file."""
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        pickled = os.path.join(directory, "adapter_model.bin")
        if os.path.isfile(pickled):
            raise ValueError(f"{pickled}: a pickled PyTorch file, which prompt_jax refuses to "
                             f"load; re-save the adapter as {ADAPTER_WEIGHTS} "
                             "(save_pretrained(..., safe_serialization=True))")
        raise FileNotFoundError(f"{weights}: missing; a PEFT adapter directory holds "
                                f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    tensor = _safetensor(weights, PROMPT_TENSOR)
    if tensor.shape != expected:
        raise ValueError(f"{weights}: {PROMPT_TENSOR} has shape {tensor.shape}, expected "
                         f"{expected} ({why} in {ADAPTER_CONFIG})")
    tensor = tensor.astype(np.float32)
    if not np.isfinite(tensor).all():
        raise ValueError(f"{weights}: {PROMPT_TENSOR} holds "
                         f"{int(tensor.size - np.isfinite(tensor).sum())} NaN/inf values")
    return tensor


def _safetensor(path: str, name: str) -> np.ndarray:
    """Tensor `name` of a safetensors file, float dtypes only (bfloat16 included)."""
    import ml_dtypes

    dtypes = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
              "BF16": np.dtype(ml_dtypes.bfloat16)}
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < size <= len(data) - 8:
            raise ValueError(f"header size {size} for a file of {len(data)} bytes")
        header = json.loads(data[8:8 + size])
    except ValueError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if name not in header:
        found = sorted(k for k in header if k != "__metadata__")
        raise ValueError(f"{path}: no tensor {name} (found {found}); a PEFT prompt adapter "
                         f"saves its prompt as {name}")
    entry = header[name] if isinstance(header[name], dict) else {}
    if entry.get("dtype") not in dtypes:
        raise ValueError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, expected a "
                         "float (F32, BF16, F16)")
    dtype, shape = dtypes[entry["dtype"]], tuple(entry.get("shape", ()))
    begin, end = entry.get("data_offsets", (0, -1))
    raw = data[8 + size + begin: 8 + size + end]
    if end - begin != len(raw) or len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name} of shape {shape} {entry['dtype']} has "
                         f"{len(raw)} bytes of data; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype).reshape(shape)


def load_peft(directory: str, d_model: int | None = None) -> np.ndarray:
    """The encoder prompt of a PEFT PROMPT_TUNING or P_TUNING adapter -> float32 [P, E].

    Raises (naming the file and the field, expected vs found) for: a missing directory
    or file (FileNotFoundError), another peft_type or task_type, a `token_dim` other than
    `d_model` when given, a `prompt_embeddings` tensor of another shape or dtype, NaN/inf,
    and a pickled `adapter_model.bin` without safetensors (ValueError).
    """
    directory = os.fspath(directory).rstrip("/") or "/"
    config, config_path = read_adapter_config(directory)
    peft_type = config.get("peft_type")
    if peft_type not in PROMPT_TYPES:
        why = _WHY_NOT.get(peft_type, f"a {peft_type} adapter changes the model, not its "
                                      "input; only prompt adapters load as a prompt")
        raise ValueError(f"{config_path}: peft_type is {peft_type!r}, expected PROMPT_TUNING "
                         f"or P_TUNING ({why})")
    if config.get("task_type") != TASK_TYPE:
        raise ValueError(f"{config_path}: task_type is {config.get('task_type')!r}, expected "
                         f"{TASK_TYPE!r} (a prompt for an encoder-decoder model such as T5)")
    length = _positive_int(config, "num_virtual_tokens", config_path)
    width = _positive_int(config, "token_dim", config_path)
    if d_model is not None and width != d_model:
        raise ValueError(f"{config_path}: token_dim is {width}, expected {d_model} (d_model of "
                         "the frozen model)")
    submodules = config.get("num_transformer_submodules")
    submodules = 2 if submodules is None else submodules  # PEFT's seq2seq default
    if submodules not in (1, 2):
        raise ValueError(f"{config_path}: field num_transformer_submodules is {submodules!r}, "
                         "expected 1 or 2")

    expected = (length * submodules, width)
    return _adapter_tensor(directory, expected, f"num_virtual_tokens {length} x "
                           f"num_transformer_submodules {submodules}, token_dim {width}")[:length]


# ------------------------------------------------------- PREFIX_TUNING (deep prompts)

PREFIX_TYPE = "PREFIX_TUNING"


def save_peft_prefix(matrix: np.ndarray, directory: str,
                     base_model_name_or_path: str | None = None, *,
                     config: T5Config | None = None, num_layers: int | None = None,
                     num_heads: int | None = None, d_kv: int | None = None) -> None:
    """Write a prefix-tuning matrix [N, num_layers*2*H*D] (`methods.deep_prompts`, method
    prefix_tuning) as a PEFT PREFIX_TUNING adapter for a seq2seq T5 of `config` (or of
    the sizes given: the encoder's depth, heads, d_kv).

    `PeftModel.from_pretrained(t5, directory)` then gives prompt_jax's logits: the fields are
    those PEFT 0.21 writes (`num_transformer_submodules=2`, `prefix_projection=False`: the
    saved matrix is the prefix itself, as PEFT saves a projected one). Raises ValueError
    naming `directory` for a matrix of another shape or holding NaN/inf.
    """
    directory = os.fspath(directory)
    matrix = np.asarray(matrix, dtype=np.float32)
    if config is not None:
        num_layers, num_heads, d_kv = config.num_encoder_layers, config.num_heads, config.d_kv
    d_model = _model_sizes(base_model_name_or_path, config)[0] or num_heads * d_kv
    token_dim = num_heads * d_kv
    width = num_layers * 2 * token_dim
    if matrix.ndim != 2 or matrix.shape[1] != width:
        raise ValueError(f"{directory}: refusing to save a prefix of shape {matrix.shape}, "
                         f"expected [N, {width}] (num_layers {num_layers} x 2 x "
                         f"token_dim {token_dim})")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{directory}: refusing to save a prefix holding "
                         f"{int(matrix.size - np.isfinite(matrix).sum())} NaN/inf values")
    adapter_config = {  # the fields PEFT 0.21 writes for PrefixTuningConfig, less peft_version
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": d_model,  # unused without prefix_projection
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": None,
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 2,
        "num_virtual_tokens": int(matrix.shape[0]),
        "peft_type": PREFIX_TYPE,
        "prefix_projection": False,
        "revision": None,
        "task_type": TASK_TYPE,
        "token_dim": token_dim,
    }
    _write_adapter(directory, adapter_config, matrix)


def is_peft_prefix(path: str) -> bool:
    """Whether `path` is a PEFT adapter directory of peft_type PREFIX_TUNING."""
    if not is_peft_adapter(path):
        return False
    try:
        return read_adapter_config(os.fspath(path))[0].get("peft_type") == PREFIX_TYPE
    except ValueError:
        return False


def load_peft_prefix(directory: str, config: T5Config) -> np.ndarray:
    """The prefix matrix of a PEFT PREFIX_TUNING adapter -> float32 [N, num_layers*2*H*D].

    What PEFT saves (its `prompt_embeddings`; with `prefix_projection` the projection's
    output). Checked against the frozen model `config`: task_type SEQ_2_SEQ_LM,
    `num_layers` = its encoder depth, `num_attention_heads` = its heads, `token_dim` = heads
    x d_kv, `num_transformer_submodules` 2 (PEFT's seq2seq layout); raises naming the file
    and the field, expected vs found.
    """
    directory = os.fspath(directory).rstrip("/") or "/"
    found, config_path = read_adapter_config(directory)
    if found.get("peft_type") != PREFIX_TYPE:
        raise ValueError(f"{config_path}: peft_type is {found.get('peft_type')!r}, expected "
                         f"{PREFIX_TYPE!r}")
    if found.get("task_type") != TASK_TYPE:
        raise ValueError(f"{config_path}: task_type is {found.get('task_type')!r}, expected "
                         f"{TASK_TYPE!r} (prefixes for an encoder-decoder model such as T5)")
    length = _positive_int(found, "num_virtual_tokens", config_path)
    for field, want in (("num_layers", config.num_encoder_layers),
                        ("num_attention_heads", config.num_heads),
                        ("token_dim", config.joined_kv),
                        ("num_transformer_submodules", 2)):
        if found.get(field) != want:
            raise ValueError(f"{config_path}: {field} is {found.get(field)!r}, expected {want} "
                             "(the frozen model's; PEFT's seq2seq prefix layout)")
    expected = (length, config.num_encoder_layers * 2 * config.joined_kv)
    return _adapter_tensor(directory, expected,
                           f"num_virtual_tokens {length}, num_layers x 2 x token_dim")
