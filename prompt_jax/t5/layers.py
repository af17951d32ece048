"""T5 building blocks in Flax linen, named as t5x/flaxformer name them.

Every parameter carries logical axis names (`vocab`, `embed`, `joined_kv`,
`mlp`, `heads`, `relpos_buckets`) through `nn.with_logical_partitioning`;
`prompt_jax.partitioning` maps them to mesh axes. Key activations carry
`batch`/`length`/... constraints, which are no-ops outside a mesh.

Shapes: B batch, T/Q/K sequence lengths (query/key), E d_model, H heads,
D d_kv (per head), F d_ff, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prompt_jax.t5.config import DROPOUT_IMPLS

Array = jax.Array
Initializer = Callable[..., Array]

# Masked attention logits; finite so that a fully masked row stays NaN-free.
NEG_INF = -1e10


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    """Logical sharding constraint (no-op unless a mesh and rules are active)."""
    return nn.with_logical_constraint(x, axes)


def normal(stddev: float) -> Initializer:
    return nn.initializers.normal(stddev=stddev)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias; computed in fp32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
    """`x @ kernel` with no bias; the kernel is stored `[in, out]` as in t5x."""

    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            self.param_dtype,
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
    """Token embedding `[V, E]`; `attend` gives the tied output projection."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(normal(1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        """ids [B, T] int -> [B, T, E]."""
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """x [B, L, E] -> [B, L, V]."""
        return attend(x.astype(self.dtype), self.embedding.astype(self.dtype))


@jax.custom_vjp
def attend(x: Array, table: Array) -> Array:
    """x [..., E] · table [V, E]ᵀ -> [..., V]: the tied output projection.

    The same product and gradients as `jnp.dot(x, table.T)`; only the table's gradient is
    computed differently. Autodiff's form makes XLA's CPU backend copy the [N, V] logits
    gradient into a transposed [V, N] layout before the dot (40% of an in-house T5's
    pretraining step, bench/profile_train_step.py); here it is x2ᵀ · g2 -> [E, V] (no copy
    of the big operand) and only that small result is transposed.
    """
    return jnp.dot(x, table.T)


def _attend_fwd(x, table):
    return jnp.dot(x, table.T), (x, table)


def _attend_bwd(residuals, g):
    x, table = residuals
    dx = jnp.dot(g, table)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    # The barrier keeps XLA from folding the transpose back into the dot (the slow form).
    d_table = jax.lax.optimization_barrier(jnp.dot(x2.T, g2)).T
    return dx, d_table.astype(table.dtype)


attend.defvjp(_attend_fwd, _attend_bwd)


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucketing of `memory_position - query_position` (Mesh TensorFlow / HF).

    Half the buckets (per direction) hold exact small distances, the rest grow
    logarithmically up to `max_distance`. Computed in numpy float32, in the
    same order of operations as the reference, because positions are static.
    """
    rp = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets += (rp > 0).astype(np.int64) * num_buckets
        rp = np.abs(rp)
    else:
        rp = -np.minimum(rp, 0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(rp.astype(np.float32) / np.float32(max_exact))
            / np.float32(np.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rp, large)


@functools.lru_cache(maxsize=64)
def _bucket_matrix(
    q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    context = np.arange(q_len)[:, None]
    memory = np.arange(k_len)[None, :]
    return relative_position_bucket(memory - context, bidirectional, num_buckets, max_distance)


class RelativePositionBiases(nn.Module):
    """One `[H, buckets]` bias table per stack, added to every layer's attention logits."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self, q_len: int, k_len: int, bidirectional: bool, query_offset: Array | None = None,
        key_prefix: int = 0, query_shift: Array | None = None,
    ) -> Array:
        """Bias [1, H, Q, N+K]. With `query_offset` (decoding), Q=1 at that position.

        `key_prefix` N > 0: N prefix keys precede the K keys (deep prompts, prefix tuning) at
        positions 0..N-1, the queries and keys shifted to N.. — what HF T5 computes for an
        attention cache already holding N positions (`compute_bias(past_seen_tokens=N)`),
        and so what PEFT's prefix tuning gets; bias[..., N:] is the bias without a prefix.

        `query_shift` [B] (with N > 0): row b's positions count from its element
        `query_shift[b]` (its first real one, past a left-padded prompt), so the prefix keys
        see each row's queries where they would be without the padding; the bias is then
        [B, H, Q, N+K] (the K part, relative between real positions, is the same for all).
        """
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(normal(0.1), ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        n = key_prefix
        if query_offset is None:
            buckets = jnp.asarray(_bucket_matrix(
                n + q_len, n + k_len, bidirectional, self.num_buckets, self.max_distance)[n:])
        else:
            full = jnp.asarray(_bucket_matrix(
                n + k_len, n + k_len, bidirectional, self.num_buckets, self.max_distance))
            buckets = jax.lax.dynamic_slice_in_dim(full, n + query_offset, 1, axis=0)
        # [H, buckets] gathered by [Q, K] -> [H, Q, K]
        bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)[None]
        if query_shift is not None and n > 0:
            if query_offset is not None:
                raise ValueError("query_shift is for whole sequences, not decoding steps")
            # Prefix key j against row b's query q: j - (N + q - shift[b]), looked up in the
            # buckets of every distance that can occur.
            lo = -(n + q_len - 1)
            distances = relative_position_bucket(np.arange(lo, q_len), bidirectional,
                                                 self.num_buckets, self.max_distance)
            rel = (jnp.arange(n)[None, None, :] - n - jnp.arange(q_len)[None, :, None]
                   + query_shift.astype(jnp.int32)[:, None, None])
            prefix = jnp.take(table.astype(jnp.float32), jnp.asarray(distances)[rel - lo],
                              axis=1)  # [H, B, Q, N]
            bias = jnp.concatenate(
                [jnp.moveaxis(prefix, 0, 1),
                 jnp.broadcast_to(bias[..., n:], (rel.shape[0],) + bias.shape[1:-1] + (k_len,))],
                axis=-1)
        return bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Unscaled dot-product attention (T5 folds 1/sqrt(D) into the query init).

    With `decode=True`, keys and values are appended to a `cache` collection
    (`cached_key`, `cached_value` [B, K_max, H, D] and `cache_index`), and the
    query attends to the positions written so far. With `static_kv` as well
    (cross-attention: `x_kv` is the encoder output, the same at every step), the
    keys and values are projected once, when the cache is created, into
    `cached_cross_key`, `cached_cross_value` [B, K, H, D], and read from there after.

    `kv_prefix` (keys, values), each [N, H, D] or [B, N, H, D], is prepended to the keys and
    values after any cache (the cache holds the real positions only); every query sees the
    N prefix positions, and `bias` must then cover them ([1, H, Q, N+K]).
    """

    num_heads: int
    d_kv: int
    d_model: int
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "packed"

    @nn.compact
    def __call__(
        self,
        x_q: Array,
        x_kv: Array,
        mask: Array | None,
        bias: Array | None = None,
        *,
        kv_prefix: tuple[Array, Array] | None = None,
        decode: bool = False,
        static_kv: bool = False,
        deterministic: bool = True,
    ) -> Array:
        """x_q [B, Q, E], x_kv [B, K, E], mask [B, 1, Q, K] bool, bias [1, H, Q, K] -> [B, Q, E]."""
        joined = self.num_heads * self.d_kv
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)

        def project(name: str, x: Array, stddev: float) -> Array:
            y = dense(joined, ("embed", "joined_kv"), normal(stddev), name=name)(x)
            y = y.reshape(y.shape[:2] + (self.num_heads, self.d_kv))
            return constrain(y, ("batch", "length", "heads", "kv"))

        query = project("query", x_q, (self.d_model * self.d_kv) ** -0.5)
        if decode and static_kv:
            # Made by the variables' initialisers only: a decoding step projects nothing of x_kv.
            key = self.variable("cache", "cached_cross_key", project, "key", x_kv,
                                self.d_model**-0.5).value
            value = self.variable("cache", "cached_cross_value", project, "value", x_kv,
                                  self.d_model**-0.5).value
        else:
            key = project("key", x_kv, self.d_model**-0.5)
            value = project("value", x_kv, self.d_model**-0.5)

        if decode and not static_kv:
            initialized = self.has_variable("cache", "cached_key")
            cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                         value.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialized:
                if x_q.shape[1] != 1:
                    raise ValueError(f"decoding takes one token per step, got {x_q.shape[1]}")
                index = cache_index.value
                key = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
                value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
                cached_key.value, cached_value.value = key, value
                cache_index.value = index + 1
                written = jnp.arange(key.shape[1]) <= index
                causal = written[None, None, None, :]
                mask = causal if mask is None else jnp.logical_and(mask, causal)

        if kv_prefix is not None:
            batch = key.shape[0]
            key, value = (jnp.concatenate([jnp.broadcast_to(
                p.astype(x.dtype), (batch,) + p.shape[-3:]), x], axis=1)
                for p, x in zip(kv_prefix, (key, value), strict=True))
            if mask is not None:
                n = kv_prefix[0].shape[-3]
                seen = jnp.ones(mask.shape[:-1] + (n,), bool)
                mask = jnp.concatenate([seen, mask], axis=-1)

        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        if not deterministic and self.dropout_rate > 0.0:
            # One mask shared across batch and heads, as flaxformer's T5 (broadcast_dropout).
            weights = dropout(self.dropout_rate, False, self.dropout_impl, (0, 1))(weights)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        out = out.reshape(out.shape[:2] + (joined,))
        return dense(self.d_model, ("joined_kv", "embed"), normal(joined**-0.5), name="out")(out)


class MLP(nn.Module):
    """T5 feed-forward: ReLU (`wi`) or gated GELU (`wi_0` gelu * `wi_1` linear), then `wo`."""

    d_ff: int
    d_model: int
    gated_gelu: bool
    dropout_rate: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dropout_impl: str = "packed"

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
        wi_init = normal(self.d_model**-0.5)
        if self.gated_gelu:
            # tanh-approximated GELU, as T5 1.1 (mesh-tf) and HF's `gelu_new`.
            gate = jax.nn.gelu(dense(self.d_ff, ("embed", "mlp"), wi_init, name="wi_0")(x),
                               approximate=True)
            h = gate * dense(self.d_ff, ("embed", "mlp"), wi_init, name="wi_1")(x)
        else:
            h = jax.nn.relu(dense(self.d_ff, ("embed", "mlp"), wi_init, name="wi")(x))
        h = constrain(h, ("batch", "length", "mlp"))
        if not deterministic and self.dropout_rate > 0.0:
            h = dropout(self.dropout_rate, False, self.dropout_impl)(h)
        return dense(self.d_model, ("mlp", "embed"), normal(self.d_ff**-0.5), name="wo")(h)


def attention_mask(query_valid: Array, key_valid: Array) -> Array:
    """[B, Q] and [B, K] bool -> [B, 1, Q, K]."""
    return jnp.logical_and(query_valid[:, None, :, None], key_valid[:, None, None, :])


def causal_mask(length: int) -> Array:
    """[1, 1, L, L]: query i sees keys <= i."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def dropout(rate: float, deterministic: bool, impl: str = "packed",
            broadcast_dims: tuple[int, ...] = ()) -> Callable[[Array], Array]:
    """x -> x with each element (or slice, along `broadcast_dims`) zeroed with probability
    `rate` and the rest scaled to keep the mean, drawing from the "dropout" rng stream of
    the calling module (a new submodule per call, as flax names them)."""
    if deterministic or rate == 0.0:
        return lambda x: x
    if impl == "flax":
        return lambda x: nn.Dropout(rate, broadcast_dims=broadcast_dims)(x, deterministic=False)
    if impl != "packed":
        raise ValueError(f"dropout impl must be one of {DROPOUT_IMPLS}, got {impl!r}")
    return lambda x: PackedDropout(rate, broadcast_dims)(x)


class PackedDropout(nn.Module):
    """Dropout whose mask costs a quarter of flax's random bits.

    Each element is dropped when a 16-bit draw is below round(rate * 2**16), so the drop
    probability is that count / 2**16 (0.1 -> 0.100006) and kept values are scaled by the
    inverse of the exact keep probability (E[output] = x). The draws come four at a time
    from one Threefry-2x32 block (two 32-bit words) keyed by the module's "dropout" rng and
    counted by element position, elementwise in the array's own shape, so XLA partitions it
    like any elementwise op. flax's nn.Dropout spends a whole block per element (a float32
    uniform); the profile of the T5 1.1 small prompt-tuning step put 30% of its op time in
    those bits (bench/RESULTS.md).
    """

    rate: float
    broadcast_dims: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = tuple(1 if d in self.broadcast_dims else n for d, n in enumerate(x.shape))
        threshold = int(round(self.rate * 2**16))
        keep = packed_uniform16(self.make_rng("dropout"), shape) >= threshold
        scale = jnp.asarray(2**16 / (2**16 - threshold), x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


def packed_uniform16(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 [shape] of independent uniform 16-bit values, four per Threefry block when the
    last dimension is a multiple of 4 (else one per block)."""
    from jax.extend.random import threefry2x32_p

    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,):
        raise ValueError(f"packed dropout needs a Threefry key (2 words), got shape {key.shape}")
    packed = len(shape) > 0 and shape[-1] % 4 == 0
    blocks = shape[:-1] + (shape[-1] // 4,) if packed else shape
    if int(np.prod(blocks)) >= 2**32:
        raise ValueError(f"packed dropout counts blocks in 32 bits; {shape} needs more")
    # Linear block index from per-dimension iotas: elementwise, so it partitions.
    strides = np.cumprod((1,) + blocks[::-1])[:-1][::-1]
    count = sum((jax.lax.broadcasted_iota(jnp.uint32, blocks, d) * jnp.uint32(s)
                 for d, s in enumerate(strides)), jnp.zeros(blocks, jnp.uint32))
    lo, hi = threefry2x32_p.bind(key[0], key[1], count, jnp.zeros_like(count))
    if not packed:
        return lo & 0xFFFF
    draws = jnp.stack([lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16], axis=-1)
    return draws.reshape(shape)
