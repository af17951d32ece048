"""Deep prompts: learned key/value prefixes in T5's attention (P-tuning v2, prefix tuning).

Both methods learn one matrix in PEFT's layout, `deep_prompt/embedding` [N, S*2*H*D]
(N virtual tokens, S layer slots, each a key and a value prefix of H heads x D), viewed
as [N, S*2, H, D]: slot 2s holds keys, 2s+1 values. With `projection_hidden` > 0 the
matrix is produced by PEFT's "prefix projection" (P-tuning v2's reparameterization): an
embedding `deep_prompt/embedding` [N, H*D] through `transform_0` (H*D -> hidden), tanh,
`transform_1` (hidden -> S*2*H*D), each with a bias. What is saved (`save_deep_prompt`,
the run's `deep_prompts/<step>.npz` and `best_deep_prompt.npz`) is always the matrix
itself, so eval, infer and PEFT need no projection.

Where the prefixes go (`DeepPromptSpec.method`):

- `p_tuning_v2`: the self-attention of the encoder layers `layers` (default all), slot s
  to layer `layers[s]`. The decoder is untouched.
- `prefix_tuning`: exactly what PEFT 0.21 `PrefixTuningConfig` does to a Hugging Face T5
  (transformers 5), tested against it: S = `num_layers` = the encoder's depth (PEFT reads
  `num_layers` from the T5 config); PEFT concatenates the [N, 2S, H, D] view with itself
  (`num_transformer_submodules=2`) and splits it into per-layer (self key, self value,
  cross key, cross value) quadruples, so decoder layer j's self-attention gets keys from
  slot `4j mod 2S` and values from slot `(4j + 1) mod 2S`; the cross-attention prefixes
  are discarded (PEFT replaces that cache with an empty one), and the encoder gets none.
  With an even S, half the slots (2..3, 6..7, ...) are therefore unused and layers j and
  j + S/2 share their prefix — PEFT's behaviour, kept for parity.

Relative position bias of a prefix (`RelativePositionBiases(key_prefix=N)`): the prefix
keys sit at positions 0..N-1 before the tokens, which start at N — what HF T5 computes
for an attention cache already holding N positions, and so what PEFT's prefixes get.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.files import write_atomically
from prompt_jax.t5.config import T5Config

Array = jax.Array
METHODS = ("p_tuning_v2", "prefix_tuning")
DEEP_PROMPT_PATH = "deep_prompt"  # the params' scope in T5; matched by `.*prompt.*`
EMBEDDING = "embedding"
HEAD_KERNEL, HEAD_BIAS = "head_kernel", "head_bias"  # P-tuning v2's classification head
ARTIFACT_KEYS = ("method", "embedding", "layers", "num_heads", "d_kv")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DeepPromptSpec:
    """Which deep prompt a T5 has (see the module docstring).

    `length`: N virtual tokens. `layers`: for p_tuning_v2, the encoder layers that get a
    prefix (None: all; e.g. the upper half, which the P-tuning v2 notes find carries most
    of the gain). `projection_hidden`: 0 learns the prefixes directly; > 0 is PEFT's
    `prefix_projection` with `encoder_hidden_size=projection_hidden`.
    `classification_head` (p_tuning_v2 only; methods/p_tuning_v2_head.gin): P-tuning v2's
    classifier, a linear layer on the encoder's outputs averaged over the input's positions,
    trained with the prefixes on the cross-entropy of the task's classes in place of the
    decoder's generation loss (the paper's Section 3.3: "a randomly-initialized
    classification head on top of the tokens as in BERT"); `num_classes` is its width, which
    the train job fills in from the task's labels (0: not yet known).
    """

    method: str = "p_tuning_v2"
    length: int = 20
    layers: tuple[int, ...] | None = None
    projection_hidden: int = 0
    classification_head: bool = False
    num_classes: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"DeepPromptSpec.method={self.method!r} is not one of "
                             f"{', '.join(METHODS)}")
        if not isinstance(self.classification_head, bool):
            raise ValueError(f"DeepPromptSpec.classification_head must be True or False, got "
                             f"{self.classification_head!r}")
        if self.classification_head and self.method != "p_tuning_v2":
            raise ValueError(f"DeepPromptSpec.classification_head is P-tuning v2's; "
                             f"{self.method} scores the decoder's words")
        if not isinstance(self.num_classes, int) or self.num_classes < 0 or (
                self.num_classes and not self.classification_head) or self.num_classes == 1:
            raise ValueError(f"DeepPromptSpec.num_classes={self.num_classes!r}: the head's "
                             "class count, >= 2, with classification_head=True only")
        for field in ("length", "projection_hidden"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DeepPromptSpec.{field} must be a non-negative integer, "
                                 f"got {value!r}")
        if self.length == 0:
            raise ValueError("DeepPromptSpec.length must be positive, got 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))  # gin passes lists
            if self.method != "p_tuning_v2":
                raise ValueError(f"DeepPromptSpec.layers is for p_tuning_v2; {self.method} "
                                 "places its prefixes as PEFT does")
            if not self.layers or list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"DeepPromptSpec.layers={list(self.layers)} must be distinct "
                                 "layer indices in increasing order")

    def slots(self, config: T5Config) -> int:
        """S, the number of (key, value) slots of the matrix."""
        return len(self.layer_indices(config)) if self.method == "p_tuning_v2" \
            else config.num_encoder_layers

    def width(self, config: T5Config) -> int:
        """S*2*H*D: the matrix's width (PEFT's `num_layers * 2 * token_dim`)."""
        return self.slots(config) * 2 * config.joined_kv

    def layer_indices(self, config: T5Config) -> tuple[int, ...]:
        """p_tuning_v2's encoder layers, checked against `config`."""
        layers = self.layers if self.layers is not None else tuple(
            range(config.num_encoder_layers))
        if layers[0] < 0 or layers[-1] >= config.num_encoder_layers:
            raise ValueError(f"DeepPromptSpec.layers={list(layers)}: the encoder has layers "
                             f"0..{config.num_encoder_layers - 1}")
        return layers

    def placement(self, config: T5Config) -> dict[str, dict[int, tuple[int, int]]]:
        """{'encoder'|'decoder': {layer: (key slot, value slot)}} in the [N, 2S, H, D] view."""
        if self.method == "p_tuning_v2":
            return {"encoder": {layer: (2 * s, 2 * s + 1)
                                for s, layer in enumerate(self.layer_indices(config))},
                    "decoder": {}}
        slots = 2 * config.num_encoder_layers
        if config.num_decoder_layers > config.num_encoder_layers:
            raise ValueError(f"prefix_tuning: PEFT's layout covers num_layers="
                             f"{config.num_encoder_layers} decoder layers (the encoder's "
                             f"depth); this decoder has {config.num_decoder_layers}")
        return {"encoder": {},
                "decoder": {j: (4 * j % slots, (4 * j + 1) % slots)
                            for j in range(config.num_decoder_layers)}}

    def head_classes(self) -> int:
        """The head's class count; raises while the task has not filled it in."""
        if not self.num_classes:
            raise ValueError("DeepPromptSpec.classification_head: num_classes is not set; the "
                             "train job sets it from the task's labels (with_classes)")
        return self.num_classes

    def with_classes(self, task_name: str) -> DeepPromptSpec:
        """The spec with the head sized for `task_name`'s labels (unchanged without a head);
        a clear error for a task without class labels."""
        if not self.classification_head:
            return self
        from prompt_jax import tasks

        labels = tasks.class_labels(task_name)
        if not labels or len(labels) < 2:
            raise ValueError(f"DeepPromptSpec.classification_head: {task_name} has no class "
                             "labels to classify (a classification task, not a mixture, is "
                             "needed)")
        return dataclasses.replace(self, num_classes=len(labels))

    def for_inference(self) -> DeepPromptSpec:
        """The spec of the saved matrix: the same prefixes with no projection."""
        return dataclasses.replace(self, projection_hidden=0)


def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default init (weights and biases U(-1/sqrt(fan_in), ...)), PEFT's."""
    bound = fan_in**-0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                    bound)


class DeepPrompt(nn.Module):
    """The matrix of a `DeepPromptSpec`: `() -> [N, S*2*H*D]` float32 (the prompt's dtype,
    whatever the frozen weights'); `split_prefixes` gives each layer its keys and values.
    With a classification head, `classify(pooled [B, E]) -> logits [B, C]` (its
    `head_kernel` [E, C] and `head_bias` [C] live beside the prefixes)."""

    spec: DeepPromptSpec
    config: T5Config

    def setup(self):
        spec, cfg = self.spec, self.config
        width, token_dim = spec.width(cfg), cfg.joined_kv
        param = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
        # PEFT's init: torch.nn.Embedding is N(0, 1).
        if spec.projection_hidden == 0:
            self.embedding = param(EMBEDDING, nn.initializers.normal(1.0), (spec.length, width),
                                   ("prompt", "prompt_embed"))
        else:
            hidden = spec.projection_hidden
            self.embedding = param(EMBEDDING, nn.initializers.normal(1.0),
                                   (spec.length, token_dim), ("prompt", "prompt_embed"))
            init0, init1 = _torch_linear_init(token_dim), _torch_linear_init(hidden)
            self.projection = (
                param("transform_0_kernel", init0, (token_dim, hidden), ("prompt_embed", None)),
                param("transform_0_bias", init0, (hidden,), (None,)),
                param("transform_1_kernel", init1, (hidden, width), (None, "prompt_embed")),
                param("transform_1_bias", init1, (width,), ("prompt_embed",)))
        if spec.classification_head:
            # The reference's head is a torch Linear initialised as BERT's (N(0, 0.02)).
            self.head = (param(HEAD_KERNEL, nn.initializers.normal(0.02),
                               (cfg.d_model, spec.head_classes()), (None, None)),
                         param(HEAD_BIAS, nn.initializers.zeros, (spec.head_classes(),),
                               (None,)))

    def __call__(self) -> Array:
        if self.spec.projection_hidden == 0:
            return self.embedding
        kernel_0, bias_0, kernel_1, bias_1 = self.projection
        return jnp.tanh(self.embedding @ kernel_0 + bias_0) @ kernel_1 + bias_1

    def classify(self, pooled: Array) -> Array:
        """The classification head: pooled encoder outputs [B, E] -> logits [B, C] float32."""
        kernel, bias = self.head
        return pooled.astype(jnp.float32) @ kernel + bias


def split_prefixes(matrix: Array, spec: DeepPromptSpec, config: T5Config
                   ) -> dict[str, dict[int, tuple[Array, Array]]]:
    """The matrix [N, S*2*H*D] -> {'encoder'|'decoder': {layer: (keys, values) [N, H, D]}}."""
    view = matrix.reshape(matrix.shape[0], 2 * spec.slots(config), config.num_heads,
                          config.d_kv)
    return {stack: {layer: (view[:, k], view[:, v]) for layer, (k, v) in slots.items()}
            for stack, slots in spec.placement(config).items()}


def deep_prompt_matrix(spec: DeepPromptSpec, config: T5Config, params: Any) -> np.ndarray:
    """The matrix [N, S*2*H*D] float32 of the `deep_prompt` params `params` (the
    projection's output when the spec has one): what `save_deep_prompt` writes."""
    return np.asarray(DeepPrompt(spec, config).apply({"params": params}), np.float32)


def init_params(spec: DeepPromptSpec, config: T5Config, rng: Array) -> dict[str, np.ndarray]:
    """Fresh deep prompt params (host arrays), as `T5(...)['deep_prompt']` holds them."""
    params = DeepPrompt(spec, config).init(rng)["params"]
    return jax.tree.map(np.asarray, nn.unbox(params))


def head_of(spec: DeepPromptSpec, params: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The classification head's (kernel [E, C], bias [C]) float32 of the `deep_prompt`
    params, or None for a spec without one."""
    if not spec.classification_head:
        return None
    return (np.asarray(params[HEAD_KERNEL], np.float32), np.asarray(params[HEAD_BIAS],
                                                                   np.float32))


def params_for(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """The `deep_prompt` params of an inference spec (no projection) holding `matrix`."""
    return {EMBEDDING: np.asarray(matrix, np.float32)}


# ------------------------------------------------------------------ files


def save_deep_prompt(path: str, spec: DeepPromptSpec, config: T5Config,
                     matrix: np.ndarray, head: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> None:
    """Write a deep prompt `.npz` (no pickle): `method` (str), `embedding` [N, S*2*H*D]
    float32, `layers` (p_tuning_v2's encoder layers; for prefix_tuning PEFT's
    0..num_layers-1), `num_heads`, `d_kv`; with a classification head also `head_kernel`
    [E, C] and `head_bias` [C] (`head_of`). Atomic."""
    matrix = np.asarray(matrix, np.float32)
    expected = (spec.length, spec.width(config))
    if matrix.shape != expected:
        raise ValueError(f"{path}: refusing to save deep prompt of shape {matrix.shape}, "
                         f"expected {expected}")
    if (head is not None) != spec.classification_head:
        raise ValueError(f"{path}: a classification head's weights go with "
                         "DeepPromptSpec.classification_head=True, and only there")
    layers = spec.layer_indices(config) if spec.method == "p_tuning_v2" else range(
        config.num_encoder_layers)
    arrays = {"method": np.array(spec.method), "embedding": matrix,
              "layers": np.asarray(list(layers), np.int64),
              "num_heads": np.array(config.num_heads), "d_kv": np.array(config.d_kv)}
    if head is not None:
        kernel, bias = (np.asarray(a, np.float32) for a in head)
        if kernel.shape != (config.d_model, spec.head_classes()) or bias.shape != (
                spec.head_classes(),):
            raise ValueError(f"{path}: refusing to save a head of shapes {kernel.shape}, "
                             f"{bias.shape}, expected ({config.d_model}, "
                             f"{spec.head_classes()}), ({spec.head_classes()},)")
        arrays.update({HEAD_KERNEL: kernel, HEAD_BIAS: bias})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomically(path, write)


def read_deep_prompt(path: str) -> dict[str, np.ndarray]:
    """The arrays of a `save_deep_prompt` file, every field present (not yet checked
    against a model)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: deep prompt file does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            found = {k: f[k] for k in f.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a deep prompt .npz ({e})") from None
    missing = [k for k in ARTIFACT_KEYS if k not in found]
    if missing:
        raise ValueError(f"{path}: no field {missing[0]} (found {sorted(found)}); a deep "
                         f"prompt file holds {', '.join(ARTIFACT_KEYS)}")
    return found


Head = tuple[np.ndarray, np.ndarray]  # P-tuning v2's classification head: (kernel, bias)


def load_deep_prompt(path: str, config: T5Config
                     ) -> tuple[DeepPromptSpec, np.ndarray, Head | None]:
    """(inference spec, matrix [N, S*2*H*D] float32, head) from a `save_deep_prompt` file,
    checked against `config`; raises naming the file and the field, expected vs found.
    `head`: a P-tuning v2 classification head's (kernel [E, C], bias [C]) float32, the
    spec's `classification_head` and `num_classes` set to match; None without one."""
    found = read_deep_prompt(path)
    for field, want in (("num_heads", config.num_heads), ("d_kv", config.d_kv)):
        if int(found[field]) != want:
            raise ValueError(f"{path}: {field} is {int(found[field])}, expected {want} "
                             "(the frozen model's)")
    method, layers = str(found["method"]), tuple(int(i) for i in found["layers"])
    matrix = found["embedding"]
    if method not in METHODS:
        raise ValueError(f"{path}: method is {method!r}, expected one of {', '.join(METHODS)}")
    if matrix.ndim != 2:
        raise ValueError(f"{path}: embedding has shape {matrix.shape}, expected [N, S*2*H*D]")
    head = _read_head(path, found, method, config)
    try:
        spec = DeepPromptSpec(method, int(matrix.shape[0]),
                              layers if method == "p_tuning_v2" else None,
                              classification_head=head is not None,
                              num_classes=0 if head is None else int(head[1].shape[0]))
        spec.placement(config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if method == "prefix_tuning" and len(layers) != config.num_encoder_layers:
        raise ValueError(f"{path}: {len(layers)} layer slots, expected "
                         f"{config.num_encoder_layers} (the encoder's depth, PEFT's num_layers)")
    expected = (spec.length, spec.width(config))
    if matrix.shape != expected:
        raise ValueError(f"{path}: embedding has shape {matrix.shape}, expected {expected}")
    return spec, _check_finite(path, EMBEDDING, matrix), head


def _read_head(path: str, found: dict[str, np.ndarray], method: str, config: T5Config
               ) -> Head | None:
    """The file's classification head, checked (both fields, p_tuning_v2 only, shapes
    [d_model, C] and [C] with C >= 2, finite), or None when it has none."""
    present = [k for k in (HEAD_KERNEL, HEAD_BIAS) if k in found]
    if not present:
        return None
    if len(present) == 1:
        missing = HEAD_BIAS if present == [HEAD_KERNEL] else HEAD_KERNEL
        raise ValueError(f"{path}: {present[0]} without {missing}; a classification head "
                         f"holds both")
    if method != "p_tuning_v2":
        raise ValueError(f"{path}: a classification head with method {method}; only "
                         "p_tuning_v2 has one")
    kernel, bias = found[HEAD_KERNEL], found[HEAD_BIAS]
    if kernel.ndim != 2 or kernel.shape[0] != config.d_model or kernel.shape[1] < 2:
        raise ValueError(f"{path}: {HEAD_KERNEL} has shape {kernel.shape}, expected "
                         f"({config.d_model}, C) with C >= 2 classes (the frozen model's "
                         "d_model)")
    if bias.shape != (kernel.shape[1],):
        raise ValueError(f"{path}: {HEAD_BIAS} has shape {bias.shape}, expected "
                         f"({kernel.shape[1]},) ({HEAD_KERNEL}'s class count)")
    return _check_finite(path, HEAD_KERNEL, kernel), _check_finite(path, HEAD_BIAS, bias)


def _check_finite(path: str, field: str, array: np.ndarray) -> np.ndarray:
    """`array` as float32, or a ValueError naming the file, the field and the bad count."""
    array = np.asarray(array).astype(np.float32)
    bad = int(array.size - np.isfinite(array).sum())
    if bad:
        raise ValueError(f"{path}: {field} holds {bad} NaN/inf values")
    return array


def check_head_task(spec: DeepPromptSpec, task_name: str, source: str) -> None:
    """A classification head can only label rows of a task with its number of classes:
    raise naming `source` otherwise (nothing to check without a head)."""
    if not spec.classification_head:
        return
    try:  # the width the train job would give a head for this task
        wanted = spec.with_classes(task_name).num_classes
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if wanted != spec.num_classes:
        raise ValueError(f"{source}: a classification head of {spec.num_classes} classes; "
                         f"{task_name} has {wanted}")


def with_matrix(flat_params: dict[str, Any], matrix: np.ndarray, head: Head | None = None
                ) -> dict[str, Any]:
    """Flat params (path -> array) plus a deep prompt's matrix (and classification head)
    where the model reads them."""
    out = {**flat_params, f"{DEEP_PROMPT_PATH}/{EMBEDDING}": matrix}
    if head is not None:
        out[f"{DEEP_PROMPT_PATH}/{HEAD_KERNEL}"], out[f"{DEEP_PROMPT_PATH}/{HEAD_BIAS}"] = head
    return out


def is_deep_prompt_artifact(path: str) -> bool:
    """Whether `path` is a deep prompt: a `save_deep_prompt` .npz or a PEFT PREFIX_TUNING
    adapter directory."""
    from prompt_jax.checkpoints import peft

    path = os.fspath(path)
    return (os.path.isfile(path) and path.endswith(".npz")) or peft.is_peft_prefix(path)


def load_deep_prompt_artifact(path: str, config: T5Config
                              ) -> tuple[DeepPromptSpec, np.ndarray, Head | None]:
    """(inference spec, matrix, head) of a deep prompt .npz (`load_deep_prompt`) or a PEFT
    PREFIX_TUNING adapter (no head)."""
    from prompt_jax.checkpoints import peft

    if peft.is_peft_prefix(path):
        matrix = peft.load_peft_prefix(path, config)
        spec = DeepPromptSpec("prefix_tuning", int(matrix.shape[0]))
        try:
            spec.placement(config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return spec, matrix, None
    return load_deep_prompt(path, config)


def export_peft(path: str, out_dir: str, base_model_name_or_path: str | None = None
                ) -> tuple[int, int]:
    """`prompt-jax export-peft` of a prefix_tuning deep prompt .npz: a PEFT PREFIX_TUNING
    adapter in `out_dir` (PEFT's own adapters are copied as they are read) -> its shape."""
    from prompt_jax.checkpoints import peft

    if peft.is_peft_prefix(path):
        found, _ = peft.read_adapter_config(path)
        matrix = peft._safetensor(os.path.join(path, peft.ADAPTER_WEIGHTS), peft.PROMPT_TENSOR)
        layers, heads = found.get("num_layers"), found.get("num_attention_heads")
        d_kv = (found.get("token_dim") or 0) // (heads or 1)
    else:
        found = read_deep_prompt(path)
        if str(found["method"]) != "prefix_tuning":
            raise ValueError(f"{path}: a {found['method']} deep prompt (encoder prefixes) has "
                             "no PEFT equivalent; PEFT's PREFIX_TUNING on T5 is method "
                             "prefix_tuning (methods/prefix_tuning.gin)")
        matrix, layers = found["embedding"], len(found["layers"])
        heads, d_kv = int(found["num_heads"]), int(found["d_kv"])
    peft.save_peft_prefix(matrix, out_dir, base_model_name_or_path, num_layers=layers,
                          num_heads=heads, d_kv=d_kv)
    return tuple(matrix.shape)
