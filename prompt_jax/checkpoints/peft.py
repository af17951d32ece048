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
                     "input prompt; they are not supported yet as a prompt",
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
    from safetensors.numpy import save_file

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
    os.makedirs(directory, exist_ok=True)

    def write_config(path):
        with open(path, "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")

    write_atomically(os.path.join(directory, ADAPTER_WEIGHTS),
                      lambda path: save_file({PROMPT_TENSOR: np.ascontiguousarray(prompt)},
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
    expected = (length * submodules, width)
    if tensor.shape != expected:
        raise ValueError(f"{weights}: {PROMPT_TENSOR} has shape {tensor.shape}, expected "
                         f"{expected} (num_virtual_tokens {length} x num_transformer_submodules "
                         f"{submodules}, token_dim {width} in {ADAPTER_CONFIG})")
    tensor = tensor.astype(np.float32)
    if not np.isfinite(tensor).all():
        raise ValueError(f"{weights}: {PROMPT_TENSOR} holds "
                         f"{int(tensor.size - np.isfinite(tensor).sum())} NaN/inf values")
    return tensor[:length]
