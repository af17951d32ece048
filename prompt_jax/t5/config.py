"""T5 model configuration: one frozen dataclass and a table of named sizes.

Sizes are data (as big_vision's `decode_variant`): `get_config("t5_1_1_base")`
returns the config of T5 1.1 base; keyword overrides replace single fields
(`get_config("t5_1_1_base", dtype="bfloat16")`).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp

DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass keeps of each encoder/decoder layer (`T5Config.remat_policy`).
REMAT_POLICIES = ("none", "full", "dots")
# How dropout draws its masks: "packed" (t5.layers.PackedDropout: 16-bit draws, four per
# Threefry block) or "flax" (flax's nn.Dropout: a 32-bit uniform per element, the stream of
# runs made before "packed" existed).
DROPOUT_IMPLS = ("packed", "flax")

# Where a prompt-tuned T5 keeps its prompt `[P, E]` (t5x/flaxformer's name); a constant of
# the model (`prompt_jax.t5.model` re-exports it), defined here so that readers of
# checkpoints can name it without importing flax modules.
PROMPT_PATH = "encoder/prompt/prompt"


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shapes and numerics of an encoder-decoder T5.

    `gated_gelu=True, tie_embeddings=False` is T5 1.1 / LM-adapted / mT5;
    `gated_gelu=False, tie_embeddings=True` is the original T5 (1.0), whose
    logits are the tied embedding's dot products scaled by `d_model**-0.5`.
    `num_heads * d_kv` need not equal `d_model` (T5 1.0 3B and 11B).

    The output layer and the inputs' tables, for any Hugging Face T5 (transformers 5
    records them separately): `tie_embeddings` makes the output layer the shared table
    `token_embedder/embedding` (else `decoder/logits_dense/kernel`); `scale_logits`
    multiplies the decoder's output by `d_model**-0.5` before it (None: exactly when
    tied, as in T5 1.0, T5 1.1 and t5x); `separate_encoder_embedding` /
    `separate_decoder_embedding` give that stack its own input table
    (`encoder/token_embedder/embedding`, `decoder/token_embedder/embedding`) instead
    of the shared one.
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 12
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    gated_gelu: bool = True
    tie_embeddings: bool = False
    scale_logits: bool | None = None
    separate_encoder_embedding: bool = False
    separate_decoder_embedding: bool = False
    dropout_rate: float = 0.1
    dropout_impl: str = "packed"  # one of DROPOUT_IMPLS; see prompt_jax.t5.layers
    layer_norm_epsilon: float = 1e-6
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"  # stored weights (frozen weights may be bfloat16)
    remat_policy: str = "none"  # one of REMAT_POLICIES; see prompt_jax.t5.model

    def __post_init__(self):
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"T5Config.{field} must be positive, got {getattr(self, field)}")
        for field in ("num_encoder_layers", "num_decoder_layers"):
            if getattr(self, field) < 1:
                raise ValueError(f"T5Config.{field} must be >= 1, got {getattr(self, field)}")
        if self.relative_attention_num_buckets < 2:
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be >= 2, "
                f"got {self.relative_attention_num_buckets}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.dropout_impl not in DROPOUT_IMPLS:
            raise ValueError(f"T5Config.dropout_impl must be one of {DROPOUT_IMPLS}, "
                             f"got {self.dropout_impl!r}")
        if self.scale_logits not in (None, True, False):
            raise ValueError(f"T5Config.scale_logits must be True, False or None (follow "
                             f"tie_embeddings), got {self.scale_logits!r}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(
                    f"T5Config.{field} must be one of {DTYPES}, got {getattr(self, field)!r}"
                )
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"T5Config.remat_policy must be one of {REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")

    @property
    def logits_scaled(self) -> bool:
        """Whether the decoder's output is scaled by `d_model**-0.5` before the logits."""
        return self.tie_embeddings if self.scale_logits is None else self.scale_logits

    @property
    def joined_kv(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def activation_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> Any:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)


def _t5_1_1(d_model, d_ff, num_heads, num_layers, vocab_size=32128):
    return dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=64,
        d_ff=d_ff,
        num_heads=num_heads,
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers,
        gated_gelu=True,
        tie_embeddings=False,
    )


def _t5_1_0(d_model, d_kv, d_ff, num_heads, num_layers):
    return dict(
        vocab_size=32128,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_heads=num_heads,
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers,
        gated_gelu=False,
        tie_embeddings=True,
    )


def _inhouse(d_model, d_kv, d_ff, num_heads, num_layers):
    return dict(_t5_1_1(d_model, d_ff, num_heads, num_layers), d_kv=d_kv, tie_embeddings=True)


# Published shapes (T5 paper Table 14; T5 1.1 and mT5 release notes). The LM-adapted
# ("lm100k") checkpoints the paper prompt-tunes share the T5 1.1 shapes.
SIZES: dict[str, dict[str, Any]] = {
    "t5_1_1_small": _t5_1_1(512, 1024, 6, 8),
    "t5_1_1_base": _t5_1_1(768, 2048, 12, 12),
    "t5_1_1_large": _t5_1_1(1024, 2816, 16, 24),
    "t5_1_1_xl": _t5_1_1(2048, 5120, 32, 24),
    "t5_1_1_xxl": _t5_1_1(4096, 10240, 64, 24),
    "t5_small": _t5_1_0(512, 64, 2048, 8, 6),
    "t5_base": _t5_1_0(768, 64, 3072, 12, 12),
    "t5_large": _t5_1_0(1024, 64, 4096, 16, 24),
    "t5_3b": _t5_1_0(1024, 128, 16384, 32, 24),
    "t5_11b": _t5_1_0(1024, 128, 65536, 128, 24),
    "mt5_small": _t5_1_1(512, 1024, 6, 8, vocab_size=250112),
    "mt5_base": _t5_1_1(768, 2048, 12, 12, vocab_size=250112),
    # For tests and the CPU-scale demo: the real vocabulary, a toy network.
    "tiny": dict(
        vocab_size=32128,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        gated_gelu=True,
        tie_embeddings=False,
    ),
    # The in-house backbones of the CPU-scale demo and reproductions (scripts/pretrain_tiny.py):
    # gated GELU as T5 1.1, embeddings tied so that a committed checkpoint stays small.
    "inhouse_mini": _inhouse(32, 16, 128, 2, 2),
    "inhouse_tiny": _inhouse(64, 16, 256, 4, 4),
    "inhouse_small": _inhouse(128, 32, 512, 4, 4),
    "inhouse_base": _inhouse(256, 32, 1024, 8, 6),
}
SIZES["t5_1_1_lm100k_small"] = SIZES["t5_1_1_small"]
SIZES["t5_1_1_lm100k_base"] = SIZES["t5_1_1_base"]
SIZES["t5_1_1_lm100k_large"] = SIZES["t5_1_1_large"]
SIZES["t5_1_1_lm100k_xl"] = SIZES["t5_1_1_xl"]
SIZES["t5_1_1_lm100k_xxl"] = SIZES["t5_1_1_xxl"]


def get_config(name: str, **overrides: Any) -> T5Config:
    """The config of a named size, with `overrides` applied."""
    if name not in SIZES:
        close = difflib.get_close_matches(name, SIZES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown T5 size {name!r}{hint} (known: {', '.join(sorted(SIZES))})")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(T5Config)}
    if unknown:
        raise ValueError(f"unknown T5Config fields {sorted(unknown)} in overrides for {name!r}")
    return T5Config(**{**SIZES[name], **overrides})
