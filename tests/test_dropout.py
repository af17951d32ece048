"""PackedDropout (t5.layers): its draws are Threefry-2x32 words split into 16-bit values
(checked against a NumPy Threefry that reproduces Random123's known answers), its drop rate
and scaling are the documented ones, and it gives one mask however the array is sharded."""

from __future__ import annotations

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prompt_jax.t5 import layers
from prompt_jax.t5.config import get_config

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key: tuple[int, int], x0: np.ndarray, x1: np.ndarray):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), in NumPy uint32 arithmetic."""
    k0, k1 = np.uint32(key[0]), np.uint32(key[1])
    ks = (k0, k1, np.uint32(0x1BD11BDA) ^ k0 ^ k1)
    x0, x1 = x0.astype(np.uint32) + ks[0], x1.astype(np.uint32) + ks[1]
    with np.errstate(over="ignore"):
        for group in range(5):
            for r in ROTATIONS[group % 2]:
                x0 = x0 + x1
                x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
            x0 = x0 + ks[(group + 1) % 3]
            x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def test_numpy_threefry_matches_random123_known_answers():
    cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for key, count, expected in cases:
        got = threefry2x32(key, np.uint32([count[0]]), np.uint32([count[1]]))
        assert (int(got[0][0]), int(got[1][0])) == expected


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 7)])
def test_draws_are_threefry_words_split_in_16_bits(shape):
    key = jax.random.PRNGKey(11)
    got = np.asarray(layers.packed_uniform16(key, shape))
    k = tuple(int(w) for w in np.asarray(key))
    if shape[-1] % 4 == 0:  # four draws per block: lo(w0), hi(w0), lo(w1), hi(w1)
        blocks = np.arange(np.prod(shape) // 4, dtype=np.uint32)
        w0, w1 = threefry2x32(k, blocks, np.zeros_like(blocks))
        want = np.stack([w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16], -1).reshape(shape)
    else:  # one draw per block
        blocks = np.arange(np.prod(shape), dtype=np.uint32)
        want = (threefry2x32(k, blocks, np.zeros_like(blocks))[0] & 0xFFFF).reshape(shape)
    np.testing.assert_array_equal(got, want)


class _Drop(nn.Module):
    rate: float
    impl: str
    broadcast_dims: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x):
        return layers.dropout(self.rate, False, self.impl, self.broadcast_dims)(x)


def _apply(x, rate=0.1, impl="packed", broadcast_dims=(), seed=0):
    return _Drop(rate, impl, broadcast_dims).apply({}, x,
                                                   rngs={"dropout": jax.random.PRNGKey(seed)})


def test_drop_rate_and_scale():
    x = jnp.ones((64, 128, 256))
    y = np.asarray(_apply(x, 0.1))
    threshold = round(0.1 * 2**16)  # 6554: drop probability 6554 / 65536
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 65536 / (65536 - threshold), rtol=1e-6)
    n = y.size
    p = threshold / 65536
    # Binomial: the dropped fraction lies within 5 standard deviations of p.
    assert abs((y == 0).mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(p / (1 - p) / n)
    # Different keys, different masks; the same key, the same mask.
    np.testing.assert_array_equal(y, np.asarray(_apply(x, 0.1)))
    assert (y != np.asarray(_apply(x, 0.1, seed=1))).mean() > 0.1


def test_broadcast_dims_share_one_mask():
    y = np.asarray(_apply(jnp.ones((4, 3, 16, 12)), 0.5, broadcast_dims=(0, 1)))
    assert 0.3 < (y[0, 0] == 0).mean() < 0.7
    for b in range(4):
        for h in range(3):
            np.testing.assert_array_equal(y[b, h], y[0, 0])


def test_flax_impl_is_flax_dropout():
    x = jnp.ones((8, 16))

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.3)(x, deterministic=False)

    want = Flax().apply({}, x, rngs={"dropout": jax.random.PRNGKey(0)})
    np.testing.assert_array_equal(_apply(x, 0.3, "flax"), want)
    with pytest.raises(ValueError, match="dropout_impl must be one of"):
        get_config("tiny", dropout_impl="fast")


def _sharded_masks_equal() -> None:
    """Run with 4 CPU devices: the mask of a [8, 6, 32] array under each sharding of a
    (2, 2) mesh equals the unsharded one."""
    mesh = jax.make_mesh((2, 2), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    x = jnp.ones((8, 6, 32))
    want = np.asarray(jax.jit(_apply)(x))
    assert 0 < (want == 0).mean() < 0.2
    for spec in (P("data"), P(None, None, "model"), P("data", None, "model")):
        sharding = NamedSharding(mesh, spec)
        got = jax.jit(_apply, in_shardings=sharding, out_shardings=sharding)(
            jax.device_put(x, sharding))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(spec))
    print("sharded masks equal")


def test_one_mask_however_sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "sharded masks equal" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-2000:])


if __name__ == "__main__":
    _sharded_masks_equal()
