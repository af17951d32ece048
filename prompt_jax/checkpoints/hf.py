"""Hugging Face T5 directories (`config.json` + safetensors) <-> our config and tree.

One table maps names; PyTorch `Linear` weights are `[out, in]` and ours are
`[in, out]`, so kernels are transposed; the relative bias is `[buckets, H]`
in HF and `[H, buckets]` in t5x. Pickled PyTorch files are never loaded.

The embeddings, as transformers 5.x reads them: `shared.weight` is the table;
`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight` and `lm_head.weight`
are tied to it unless the file holds them with other values, and then each is a
table of its own (`T5Config.separate_encoder_embedding`,
`separate_decoder_embedding`, `tie_embeddings=False`). Whether the logits are
scaled by `d_model**-0.5` is `scale_decoder_outputs`, or where a file lacks it
(transformers 4.x), `tie_word_embeddings`; that field, which transformers 5
always writes true, otherwise says only that an untied file must hold `lm_head`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from prompt_jax.checkpoints.tree import PROMPT_PATH, check_params
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.config import T5Config

# (HF name pattern, our path pattern, transpose). `{i}` is the layer index.
NAME_TABLE: list[tuple[str, str, bool]] = [
    ("shared.weight", "token_embedder/embedding", False),
    ("encoder.embed_tokens.weight", "encoder/token_embedder/embedding", False),
    ("decoder.embed_tokens.weight", "decoder/token_embedder/embedding", False),
    ("lm_head.weight", "decoder/logits_dense/kernel", True),
    ("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale", False),
    ("decoder.final_layer_norm.weight", "decoder/decoder_norm/scale", False),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "encoder/relpos_bias/rel_embedding", True),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
     "decoder/relpos_bias/rel_embedding", True),
]
_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}
_MLP = ("wi", "wi_0", "wi_1", "wo")
for _hf, _ours in _ATTN.items():
    NAME_TABLE += [
        (f"encoder.block.{{i}}.layer.0.SelfAttention.{_hf}.weight",
         f"encoder/layers_{{i}}/attention/{_ours}/kernel", True),
        (f"decoder.block.{{i}}.layer.0.SelfAttention.{_hf}.weight",
         f"decoder/layers_{{i}}/self_attention/{_ours}/kernel", True),
        (f"decoder.block.{{i}}.layer.1.EncDecAttention.{_hf}.weight",
         f"decoder/layers_{{i}}/encoder_decoder_attention/{_ours}/kernel", True),
    ]
for _w in _MLP:
    NAME_TABLE += [
        (f"encoder.block.{{i}}.layer.1.DenseReluDense.{_w}.weight",
         f"encoder/layers_{{i}}/mlp/{_w}/kernel", True),
        (f"decoder.block.{{i}}.layer.2.DenseReluDense.{_w}.weight",
         f"decoder/layers_{{i}}/mlp/{_w}/kernel", True),
    ]
NAME_TABLE += [
    ("encoder.block.{i}.layer.0.layer_norm.weight",
     "encoder/layers_{i}/pre_attention_layer_norm/scale", False),
    ("encoder.block.{i}.layer.1.layer_norm.weight",
     "encoder/layers_{i}/pre_mlp_layer_norm/scale", False),
    ("decoder.block.{i}.layer.0.layer_norm.weight",
     "decoder/layers_{i}/pre_self_attention_layer_norm/scale", False),
    ("decoder.block.{i}.layer.1.layer_norm.weight",
     "decoder/layers_{i}/pre_cross_attention_layer_norm/scale", False),
    ("decoder.block.{i}.layer.2.layer_norm.weight",
     "decoder/layers_{i}/pre_mlp_layer_norm/scale", False),
]
# What transformers ties to `shared.weight` (in this order) unless the file holds other values.
SHARED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
# In some old exports; T5 never reads it (transformers ignores it too).
_UNUSED = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"


def _own_tables(config: T5Config) -> dict[str, bool]:
    """Which of SHARED_COPIES are parameters of their own in `config`'s model."""
    return {"encoder.embed_tokens.weight": config.separate_encoder_embedding,
            "decoder.embed_tokens.weight": config.separate_decoder_embedding,
            "lm_head.weight": not config.tie_embeddings}


# The setting under which a copy is the shared table itself.
_TIED_SETTING = {"encoder.embed_tokens.weight": "separate_encoder_embedding=False",
                 "decoder.embed_tokens.weight": "separate_decoder_embedding=False",
                 "lm_head.weight": "tie_embeddings=True"}


def _compile(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


_HF_TO_OURS = [(_compile(hf), ours, t) for hf, ours, t in NAME_TABLE]
_OURS_TO_HF = [(_compile(ours), hf, t) for hf, ours, t in NAME_TABLE]


def _translate(name: str, table) -> tuple[str, bool] | None:
    for regex, target, transpose in table:
        m = regex.match(name)
        if m:
            return target.replace("{i}", m.group(1)) if m.groups() else target, transpose
    return None


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> T5Config:
    """An HF `T5Config` dict -> T5Config.

    `tie_embeddings` is the file's `tie_word_embeddings` and no stack has a table of its
    own: what the dict alone says. Which tables a directory holds is in its tensors
    (`load_hf` reads them)."""
    if hf.get("model_type", "t5") not in ("t5", "mt5"):
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not a T5 "
                         "(expected 't5' or 'mt5')")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in ("relu", "gated-gelu"):
        raise ValueError(f"{source}: feed_forward_proj {proj!r} is not supported "
                         "(expected 'relu' for T5 1.0 or 'gated-gelu' for T5 1.1)")
    tied = hf.get("tie_word_embeddings", True)
    scaled = hf.get("scale_decoder_outputs", tied)  # transformers 4.x: scaled when tied
    for field, value in (("tie_word_embeddings", tied), ("scale_decoder_outputs", scaled)):
        if not isinstance(value, bool):
            raise ValueError(f"{source}: {field} is {value!r}, expected true or false")
    try:
        return T5Config(
            vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
            num_heads=hf["num_heads"], num_encoder_layers=hf["num_layers"],
            num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            gated_gelu=proj == "gated-gelu", tie_embeddings=tied,
            scale_logits=None if scaled == tied else scaled,
            dropout_rate=hf.get("dropout_rate", 0.1),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None


def config_to_hf(config: T5Config) -> dict[str, Any]:
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": "gated-gelu" if config.gated_gelu else "relu",
        # transformers 4.x reads both the tie and the scaling from this one.
        "tie_word_embeddings": config.tie_embeddings,
        "scale_decoder_outputs": config.logits_scaled,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "is_encoder_decoder": True,
        "decoder_start_token_id": 0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "dtype": config.param_dtype,
    }


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            path = os.path.join(directory, shard)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: shard named in {index} does not exist")
            tensors.update(load_file(path))
        return tensors
    if os.path.exists(single):
        return load_file(single)
    if any(os.path.exists(os.path.join(directory, f))
           for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(
            f"{directory}: holds only a pickled PyTorch checkpoint (pytorch_model.bin), which "
            "prompt_jax refuses to load (unpickling can run arbitrary code). Convert it once, "
            "where you trust the file, to safetensors: python -c \"from transformers import "
            "T5ForConditionalGeneration as M; M.from_pretrained('IN_DIR')"
            ".save_pretrained('OUT_DIR')\"")
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def load_hf(directory: str, config: T5Config | None = None) -> tuple[T5Config, dict[str, Any]]:
    """Read an HF T5 directory -> (config, params as numpy arrays named as t5x names them).

    With `config`, the tensors are placed as it says (a copy of `shared.weight` where it
    gives a stack or the output layer a table of its own); a file it cannot express
    (a table of other values where it has one table, other logit scaling) is refused.
    """
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    found = config_from_hf(hf_config, config_path)
    tensors = _read_tensors(directory)
    tensors.pop(_UNUSED, None)
    shared = _shared_table(tensors, directory)
    own = {n: n in tensors and not _same(tensors[n], shared) for n in SHARED_COPIES}
    if not found.tie_embeddings and "lm_head.weight" not in tensors:
        raise ValueError(f"{config_path}: tie_word_embeddings is false (an output layer of its "
                         f"own), but {directory} holds no lm_head.weight")
    tied, scaled = not own["lm_head.weight"], found.logits_scaled
    found = found.replace(
        tie_embeddings=tied, scale_logits=None if scaled == tied else scaled,
        separate_encoder_embedding=own["encoder.embed_tokens.weight"],
        separate_decoder_embedding=own["decoder.embed_tokens.weight"])
    if config is not None:
        _check_expressible(config, found, hf_config, directory)
    for name, own_table in _own_tables(config or found).items():
        if own_table:  # the file's values, or where the file ties it, a copy of shared
            tensors.setdefault(name, shared)
        else:
            tensors.pop(name, None)  # equal to shared.weight (checked above)
    flat: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        hit = _translate(name, _HF_TO_OURS)
        if hit is None:
            raise ValueError(f"{directory}: unknown tensor {name!r} with shape {value.shape}")
        path, transpose = hit
        flat[path] = np.ascontiguousarray(value.T) if transpose else value
    params = unflatten(flat)
    # Against the configured model when one is given: a different architecture is named
    # by its first mismatching parameter and both shapes.
    check_params(params, config or found, directory)
    if config is not None:
        params = _cast(params, config.weight_dtype)
    return config or found, params


def _check_expressible(config: T5Config, found: T5Config, hf_config: dict[str, Any],
                       directory: str) -> None:
    """Refuse a `config` that cannot hold what the directory's model `found` holds."""
    for name, own in _own_tables(found).items():
        if own and not _own_tables(config)[name]:
            raise ValueError(f"{directory}: {name} holds values other than shared.weight, but "
                             f"the config has {_TIED_SETTING[name]} (expected a copy of "
                             "shared.weight)")
    if config.logits_scaled != found.logits_scaled:
        field = ("scale_decoder_outputs" if "scale_decoder_outputs" in hf_config
                 else "tie_word_embeddings")
        raise ValueError(f"{os.path.join(directory, 'config.json')}: {field} gives "
                         f"logits_scaled={found.logits_scaled}, but the config has "
                         f"logits_scaled={config.logits_scaled} "
                         f"(scale_logits={config.scale_logits})")


def _shared_table(tensors: dict[str, np.ndarray], directory: str) -> np.ndarray:
    """`shared.weight`, or as transformers does where a file lacks it, the first copy it
    holds (which becomes `shared.weight` in `tensors`)."""
    for name in ("shared.weight",) + SHARED_COPIES:
        if name in tensors:
            return tensors.setdefault("shared.weight", tensors[name])
    raise ValueError(f"{directory}: no shared.weight (nor any of {', '.join(SHARED_COPIES)}): "
                     "the token embeddings are missing")


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a, b)


def _cast(params: dict[str, Any], dtype) -> dict[str, Any]:
    return unflatten({k: np.asarray(v).astype(dtype) for k, v in flatten(params).items()})


def save_hf(config: T5Config, params: dict[str, Any], directory: str) -> None:
    """Write `config.json` and `model.safetensors` that transformers' T5 loads.

    A table the config ties to the shared one is not written (transformers ties it on
    reading); one of its own is (`encoder.embed_tokens.weight`, `lm_head.weight`, ...).

    The prompt (`encoder/prompt/prompt`), if present, is not part of the HF model;
    save it with `prompt_jax.prompts.save_prompt`.
    """
    from safetensors.numpy import save_file

    flat = {k: v for k, v in flatten(params).items() if k != PROMPT_PATH}
    check_params(unflatten(flat), config, "save_hf")
    tensors = {}
    for path, value in flat.items():
        hit = _translate(path, _OURS_TO_HF)
        if hit is None:  # check_params accepted it, so the table is incomplete
            raise AssertionError(f"no HF name for parameter {path}")
        name, transpose = hit
        value = np.asarray(value)
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf(config), f, indent=2)
