"""The T5 encoder-decoder, readable top to bottom.

Parameter paths follow t5x/flaxformer (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, `encoder/relpos_bias/rel_embedding`,
`decoder/layers_0/encoder_decoder_attention/out/kernel`,
`decoder/logits_dense/kernel`, ...). A prompt-tuned model adds
`encoder/prompt/prompt` `[P, E]`.

Calling convention (flaxformer's): `apply({'params': p}, encoder_input_tokens
[B, T], decoder_input_tokens [B, L], decoder_target_tokens [B, L],
enable_dropout=False) -> logits [B, L, V]`; decoder inputs are the targets
shifted right with 0 as the start token; id 0 is padding.

`config.remat_policy` says what the backward pass keeps of each encoder/decoder layer
(`nn.remat` around the layer; parameter paths are unchanged): `none` everything autodiff
saves; `full` only the layer's inputs, the rest recomputed; `dots` the layer's inputs and
the outputs of matmuls without batch dimensions — the q/k/v/out projections and the MLP's
(`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) — so the attention scores and
probabilities [B, H, Q, K], the norms and the activation functions are recomputed. One
decoding step is not differentiated, so `decode=True` runs the layers without remat.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_jax import prompts
from prompt_jax.methods.p_tuning import PromptEncoder, PromptEncoderSpec
from prompt_jax.t5.config import PROMPT_PATH, T5Config
from prompt_jax.t5.layers import (
    MLP,
    Dense,
    Embed,
    MultiHeadAttention,
    RelativePositionBiases,
    RMSNorm,
    attention_mask,
    causal_mask,
    constrain,
    dropout,
    normal,
)

Array = jax.Array
# Deep prompts: {layer index: (keys, values), each [N, H, D]} (methods/deep_prompts.py).
KVPrefixes = Mapping[int, tuple[Array, Array]]
__all__ = ["PROMPT_PATH", "T5", "abstract_params"]


def _norm(config: T5Config, name: str) -> RMSNorm:
    return RMSNorm(config.layer_norm_epsilon, config.activation_dtype, config.weight_dtype,
                   name=name)


def _attention(config: T5Config, name: str) -> MultiHeadAttention:
    return MultiHeadAttention(config.num_heads, config.d_kv, config.d_model, config.dropout_rate,
                              config.activation_dtype, config.weight_dtype,
                              config.dropout_impl, name=name)


def _mlp(config: T5Config) -> MLP:
    return MLP(config.d_ff, config.d_model, config.gated_gelu, config.dropout_rate,
               config.activation_dtype, config.weight_dtype, config.dropout_impl, name="mlp")


def _embed(config: T5Config, name: str) -> Embed:
    return Embed(config.vocab_size, config.d_model, config.activation_dtype, config.weight_dtype,
                 name=name)


def _relpos(config: T5Config) -> RelativePositionBiases:
    return RelativePositionBiases(config.relative_attention_num_buckets,
                                  config.relative_attention_max_distance, config.num_heads,
                                  config.activation_dtype, config.weight_dtype, name="relpos_bias")


def _kv_prefixes(kv_prefixes: KVPrefixes | None) -> tuple[KVPrefixes, int]:
    """(the per-layer key/value prefixes, their length N; 0 without any)."""
    kv_prefixes = kv_prefixes or {}
    lengths = {kv[0].shape[-3] for kv in kv_prefixes.values()}
    if len(lengths) > 1:
        raise ValueError(f"key/value prefixes of different lengths {sorted(lengths)}")
    return kv_prefixes, lengths.pop() if lengths else 0


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _remat(layer: type[nn.Module], config: T5Config, static: tuple[str, ...]) -> type[nn.Module]:
    """`layer` rematerialised per `config.remat_policy`; `static` names the Python-valued
    arguments of its `__call__` (flags the trace branches on)."""
    if config.remat_policy == "none":
        return layer
    names = list(inspect.signature(layer.__call__).parameters)  # `self` is argnum 0
    return nn.remat(layer, policy=_REMAT_POLICIES[config.remat_policy],
                    static_argnums=tuple(names.index(n) for n in static))


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, mask: Array, bias: Array, deterministic: bool,
                 kv_prefix: tuple[Array, Array] | None = None) -> Array:
        drop = dropout(self.config.dropout_rate, deterministic, self.config.dropout_impl)
        h = _norm(self.config, "pre_attention_layer_norm")(x)
        h = _attention(self.config, "attention")(h, h, mask, bias, kv_prefix=kv_prefix,
                                                 deterministic=deterministic)
        x = x + drop(h)
        h = _norm(self.config, "pre_mlp_layer_norm")(x)
        x = x + drop(_mlp(self.config)(h, deterministic=deterministic))
        return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, y: Array, encoded: Array, self_mask: Array | None, cross_mask: Array,
                 bias: Array, deterministic: bool, decode: bool,
                 kv_prefix: tuple[Array, Array] | None = None) -> Array:
        drop = dropout(self.config.dropout_rate, deterministic, self.config.dropout_impl)
        h = _norm(self.config, "pre_self_attention_layer_norm")(y)
        h = _attention(self.config, "self_attention")(
            h, h, self_mask, bias, kv_prefix=kv_prefix, decode=decode,
            deterministic=deterministic)
        y = y + drop(h)
        h = _norm(self.config, "pre_cross_attention_layer_norm")(y)
        h = _attention(self.config, "encoder_decoder_attention")(
            h, encoded, cross_mask, decode=decode, static_kv=True, deterministic=deterministic)
        y = y + drop(h)
        h = _norm(self.config, "pre_mlp_layer_norm")(y)
        y = y + drop(_mlp(self.config)(h, deterministic=deterministic))
        return constrain(y, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """embed -> place the soft tokens -> layers -> norm."""

    config: T5Config
    token_embedder: Embed
    prompt_length: int = 0
    prompt_encoder: PromptEncoderSpec | None = None  # P-tuning: the prompt is its output
    # Templates (methods/templates.py): the placeholder id whose positions take the prompt's
    # rows in order; None: the prompt is prepended.
    soft_token_id: int | None = None

    @nn.compact
    def __call__(self, tokens: Array, prefix: Array | None = None,
                 prefix_mask: Array | None = None, deterministic: bool = True,
                 kv_prefixes: KVPrefixes | None = None) -> tuple[Array, Array]:
        """tokens [B, T] -> (encoded [B, P+T, E], mask [B, P+T]).

        `prefix` is extra input embeddings, `[P, E]` shared or `[B, P, E]` per
        example, with an optional `prefix_mask` `[B, P]` (left-padded prompts of
        different lengths); the model's own prompt, if it has one, is the prefix.
        `kv_prefixes` {layer index: (keys, values) [N, H, D]} are deep prompts: prepended
        to those layers' self-attention keys and values (`MultiHeadAttention.kv_prefix`).
        """
        cfg = self.config
        own = cfg.separate_encoder_embedding  # a table of its own, else the shared one
        x = (_embed(cfg, "token_embedder") if own else self.token_embedder)(tokens)
        soft = None if self.soft_token_id is None else tokens == self.soft_token_id
        x, mask = self.place_soft_tokens(x, tokens > 0, prefix, prefix_mask, soft)
        x = constrain(x, ("batch", "length", "embed"))
        x = dropout(cfg.dropout_rate, deterministic, cfg.dropout_impl)(x)

        length = x.shape[1]
        kv_prefixes, n = _kv_prefixes(kv_prefixes)
        # A left-padded prompt (prefix_mask) moves a row's positions; the deep prompt's keys
        # must see them from the row's first real position, as without the padding.
        shift = None if prefix_mask is None or n == 0 else jnp.argmax(mask, axis=1)
        bias = _relpos(cfg)(length, length, bidirectional=True, key_prefix=n,
                            query_shift=shift)
        pair_mask = attention_mask(mask, mask)
        layer = _remat(EncoderLayer, cfg, static=("deterministic",))
        for i in range(cfg.num_encoder_layers):
            kv = kv_prefixes.get(i)
            x = layer(cfg, name=f"layers_{i}")(
                x, pair_mask, bias if kv else bias[..., n:], deterministic, kv)
        x = _norm(cfg, "encoder_norm")(x)
        return dropout(cfg.dropout_rate, deterministic, cfg.dropout_impl)(x), mask

    def place_soft_tokens(self, x: Array, mask: Array, prefix: Array | None,
                          prefix_mask: Array | None, soft: Array | None = None
                          ) -> tuple[Array, Array]:
        """Prepend the prompt (the model's own `prompt` param, or `prefix`) to the token
        embeddings x [B, T, E] and its positions to mask [B, T].

        With a template, `soft` [B, T] marks the placeholder positions instead: the k-th
        placeholder of row b takes prompt row k (of row b's prompt; a left-padded
        `prefix_mask` row's first real row is its row 0) and nothing is prepended."""
        if self.prompt_length:
            if prefix is not None:
                raise ValueError("this model has its own prompt; pass no prefix embeddings")
            if self.prompt_encoder is not None and self.prompt_encoder.active:
                prefix = PromptEncoder(self.prompt_length, self.config.d_model,
                                       self.prompt_encoder, name="prompt")()
            else:
                prefix = prompts.Prompt(self.prompt_length, self.config.d_model, name="prompt")()
        if prefix is None:
            return x, mask
        if prefix.ndim == 2:
            prefix = jnp.broadcast_to(prefix[None], (x.shape[0],) + prefix.shape)
        if soft is not None:
            first = 0 if prefix_mask is None else \
                prefix.shape[1] - prefix_mask.astype(jnp.int32).sum(1, keepdims=True)
            row = jnp.clip(first + jnp.cumsum(soft, axis=1) - 1, 0, prefix.shape[1] - 1)
            placed = jnp.take_along_axis(prefix, row[..., None], axis=1).astype(x.dtype)
            return jnp.where(soft[..., None], placed, x), mask
        if prefix_mask is None:
            prefix_mask = jnp.ones(prefix.shape[:2], dtype=bool)
        return (jnp.concatenate([prefix.astype(x.dtype), x], axis=1),
                jnp.concatenate([prefix_mask.astype(bool), mask], axis=1))


class Decoder(nn.Module):
    """embed -> layers (causal self-attention, cross-attention) -> norm -> logits."""

    config: T5Config
    token_embedder: Embed

    @nn.compact
    def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None, deterministic: bool = True,
                 decode: bool = False, kv_prefixes: KVPrefixes | None = None) -> Array:
        """encoded [B, S, E], encoder_mask [B, S], decoder_input_tokens [B, L] -> logits [B, L, V].

        With `decode=True` the call is one step of autoregressive decoding
        (L=1) against the `cache` collection; initialise the cache by calling
        once with the full-length `decoder_input_tokens`, which also projects
        `encoded` into each layer's cross-attention keys and values, read by every
        step after (see `decoding.init_cache`). `kv_prefixes` as for the encoder, in the
        decoder's self-attention (the cache holds the real positions only).
        """
        cfg = self.config
        own = cfg.separate_decoder_embedding  # a table of its own, else the shared one
        y = (_embed(cfg, "token_embedder") if own else self.token_embedder)(decoder_input_tokens)
        y = dropout(cfg.dropout_rate, deterministic, cfg.dropout_impl)(y)
        length = y.shape[1]
        relpos = _relpos(cfg)
        kv_prefixes, n = _kv_prefixes(kv_prefixes)

        if decode and self.has_variable("cache", "position"):
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            k_len = self.variables["cache"]["layers_0"]["self_attention"]["cached_key"].shape[1]
            bias = relpos(1, k_len, bidirectional=False, query_offset=position.value,
                          key_prefix=n)
            position.value = position.value + 1
            self_mask = None  # the attention cache masks the positions not yet written
            query_valid = jnp.ones(y.shape[:2], dtype=bool)
        else:
            if decode:  # initialising the cache (its length is this call's length)
                self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            bias = relpos(length, length, bidirectional=False, key_prefix=n)
            self_mask = causal_mask(length)
            query_valid = jnp.ones(y.shape[:2], dtype=bool)
            if decoder_target_tokens is not None:
                query_valid = decoder_target_tokens > 0
                self_mask = jnp.logical_and(self_mask, attention_mask(query_valid, query_valid))
        cross_mask = attention_mask(query_valid, encoder_mask)

        layer = DecoderLayer if decode else _remat(DecoderLayer, cfg,
                                                   static=("deterministic", "decode"))
        for i in range(cfg.num_decoder_layers):
            kv = kv_prefixes.get(i)
            y = layer(cfg, name=f"layers_{i}")(y, encoded, self_mask, cross_mask,
                                               bias if kv else bias[..., n:], deterministic,
                                               decode, kv)
        y = _norm(cfg, "decoder_norm")(y)
        y = dropout(cfg.dropout_rate, deterministic, cfg.dropout_impl)(y)
        if cfg.logits_scaled:
            y = y * cfg.d_model**-0.5
        if cfg.tie_embeddings:  # the shared table, even where the inputs have their own
            logits = self.token_embedder.attend(y)
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), normal(cfg.d_model**-0.5),
                           cfg.activation_dtype, cfg.weight_dtype, name="logits_dense")(y)
        return constrain(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
    """Encoder-decoder T5; `prompt_length > 0` adds a learned prompt to the encoder input
    (`PROMPT_PATH`; `init` draws it uniformly, the jobs set it from `build.PromptInit`)."""

    config: T5Config
    prompt_length: int = 0
    # A `methods.deep_prompts.DeepPromptSpec`: per-layer key/value prefixes (P-tuning v2,
    # prefix tuning), params under `deep_prompt/` (DEEP_PROMPT_PATH).
    deep_prompt_spec: Any = None
    # A `methods.p_tuning.PromptEncoderSpec`: P-tuning v1, the prompt is an encoder's output.
    prompt_encoder: PromptEncoderSpec | None = None
    # Templates: the prompt's rows go to this placeholder id's positions (Encoder).
    soft_token_id: int | None = None

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.d_model, cfg.activation_dtype,
                                    cfg.weight_dtype)
        # Created even where nothing reads it (both stacks have their own table and the
        # output layer is untied): checkpoints hold it (HF's `shared.weight`).
        _ = self.token_embedder.embedding
        self.encoder = Encoder(cfg, self.token_embedder, self.prompt_length, self.prompt_encoder,
                               self.soft_token_id)
        self.decoder = Decoder(cfg, self.token_embedder)
        if self.deep_prompt_spec is not None:
            from prompt_jax.methods.deep_prompts import DeepPrompt  # it imports this module

            self.deep_prompt = DeepPrompt(self.deep_prompt_spec, cfg)

    def _kv_prefixes(self, stack: str) -> KVPrefixes | None:
        if self.deep_prompt_spec is None:
            return None
        from prompt_jax.methods.deep_prompts import split_prefixes

        return split_prefixes(self.deep_prompt(), self.deep_prompt_spec, self.config)[stack]

    def encode(self, encoder_input_tokens: Array, prefix_embeddings: Array | None = None,
               prefix_mask: Array | None = None, enable_dropout: bool = False
               ) -> tuple[Array, Array]:
        """[B, T] -> (encoded [B, P+T, E], encoder mask [B, P+T]); [B, T, E] and [B, T]
        with a template (`soft_token_id`: the soft tokens are among the T)."""
        return self.encoder(encoder_input_tokens, prefix_embeddings, prefix_mask,
                            deterministic=not enable_dropout,
                            kv_prefixes=self._kv_prefixes("encoder"))

    def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Array | None = None, enable_dropout: bool = False,
               decode: bool = False) -> Array:
        """-> logits [B, L, V] (one step of L=1 when `decode`)."""
        return self.decoder(encoded, encoder_mask, decoder_input_tokens, decoder_target_tokens,
                            deterministic=not enable_dropout, decode=decode,
                            kv_prefixes=self._kv_prefixes("decoder"))

    def classify(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        """P-tuning v2's classification head (`DeepPromptSpec.classification_head`): the
        encoder's outputs averaged over its real positions (mask > 0), through the head ->
        logits [B, C] float32. The decoder takes no part."""
        encoded, mask = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        weights = (mask > 0).astype(jnp.float32)[..., None]
        pooled = (encoded.astype(jnp.float32) * weights).sum(1) / jnp.maximum(
            weights.sum(1), 1.0)
        return self.deep_prompt.classify(pooled)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Array | None = None, enable_dropout: bool = False,
                 prefix_embeddings: Array | None = None, prefix_mask: Array | None = None
                 ) -> Array:
        """Teacher-forced logits [B, L, V]."""
        encoded, mask = self.encode(encoder_input_tokens, prefix_embeddings, prefix_mask,
                                    enable_dropout)
        return self.decode(encoded, mask, decoder_input_tokens, decoder_target_tokens,
                           enable_dropout)


def abstract_params(config: T5Config, prompt_length: int = 0, *, boxed: bool = False,
                    deep_prompt_spec: Any = None, model: nn.Module | None = None):
    """The parameter tree of `T5(config, prompt_length, deep_prompt_spec)` as
    ShapeDtypeStructs, allocating nothing. `boxed=True` keeps flax's logical-axis boxes
    (what the sharding rules read). `model` (a T5 or a prompt method's subclass of it, e.g.
    `methods.multitask.MultitaskT5`) replaces the T5 the other arguments describe."""
    if model is None:
        model = T5(config, prompt_length=prompt_length, deep_prompt_spec=deep_prompt_spec)
    tokens = jnp.ones((1, 2), jnp.int32)
    params = jax.eval_shape(lambda r: model.init(r, tokens, tokens)["params"],
                            jax.random.PRNGKey(0))
    return params if boxed else nn.unbox(params)
