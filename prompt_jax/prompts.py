"""The soft prompt `[P, E]` and its initializers.

Initializers follow the reference repository's API: `init(rng, shape) -> array`.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Initializer = Callable[[jax.Array, tuple[int, ...]], Array]


def random_uniform(scale: float = 0.5) -> Initializer:
    """Uniform in [-scale, scale] (the paper's "random uniform" ablation)."""

    def init(rng: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(rng, shape, dtype, minval=-scale, maxval=scale)

    return init


class Prompt(nn.Module):
    """A learned `[P, E]` matrix (param `prompt`, logical axes `('prompt', 'embed')`).

    Kept in float32 whatever the frozen weights' dtype; cast to the activation
    dtype where it is prepended.
    """

    length: int
    embed_dim: int
    init: Initializer = random_uniform()

    @nn.compact
    def __call__(self) -> Array:
        """-> [P, E]."""
        return self.param(
            "prompt",
            nn.with_logical_partitioning(self.init, ("prompt", "embed")),
            (self.length, self.embed_dim),
        )
