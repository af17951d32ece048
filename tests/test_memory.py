"""The dry-run memory report against a hand calculation: T5 1.1 XXL prompt tuning, 4x8 mesh."""

from __future__ import annotations

import pytest

from prompt_jax import memory
from prompt_jax.t5 import get_config

# T5 1.1 XXL: V=32128, E=4096, H=64, D=64 (H*D=4096), F=10240 (gated GELU: wi_0, wi_1),
# 24 encoder and 24 decoder layers, 32 relative-position buckets, untied logits.
V, E, H, D, F, N, BUCKETS = 32128, 4096, 64, 64, 10240, 24, 32
DATA, MODEL = 4, 8
P, B, T, L = 100, 32, 512, 8  # prompt, batch, input tokens, target tokens


@pytest.fixture(scope="module")
def report():
    return memory.memory_report(
        get_config("t5_1_1_xxl"), (DATA, MODEL), prompt_length=P,
        trainable_regexes=(".*prompt.*",), batch_size=B, input_length=T, target_length=L,
        frozen_dtype="bfloat16", activation_dtype="bfloat16")


def test_frozen_parameters(report):
    # Per device, each tensor's size divided by 8 along its vocab/joined_kv/mlp/heads dim.
    embedding = (V // MODEL) * E  # token_embedder ('vocab', 'embed')
    logits = E * (V // MODEL)  # decoder/logits_dense ('embed', 'vocab')
    relpos = (H // MODEL) * BUCKETS  # ('heads', 'relpos_buckets'), one per stack
    attention = 4 * E * (H * D // MODEL)  # query, key, value, out
    mlp = 3 * E * (F // MODEL)  # wi_0, wi_1, wo
    norm = E  # ('embed',): replicated
    encoder_layer = attention + mlp + 2 * norm
    decoder_layer = 2 * attention + mlp + 3 * norm
    per_device = (embedding + logits + 2 * relpos + N * encoder_layer + N * decoder_layer
                  + 2 * norm)
    assert per_device == 1_392_353_792
    assert report.frozen_params.device_bytes == 2 * per_device  # bfloat16

    total = (2 * V * E + 2 * H * BUCKETS + N * (4 * E * H * D + 3 * E * F + 2 * E)
             + N * (8 * E * H * D + 3 * E * F + 3 * E) + 2 * E)
    assert report.frozen_params.count == total == 11_135_332_352
    assert report.frozen_params.global_bytes == 2 * total


def test_prompt_and_optimizer_state(report):
    # The prompt [100, 4096] float32 is replicated on every device.
    assert report.trainable_params.count == P * E
    assert report.trainable_params.device_bytes == P * E * 4 == 1_638_400
    # Adafactor: 100 < 128, so the second moment is a full [100, 4096] float32 `v`; plus
    # the int32 step count and optax's (1,) float32 v_row/v_col placeholders.
    assert report.optimizer_state.device_bytes == P * E * 4 + 4 + 4 + 4


def test_activations(report):
    # The estimate documented in prompt_jax/memory.py, per device: batch / 4, heads, d_ff
    # and vocab / 8; bfloat16 (2 bytes) except float32 attention probabilities and logits.
    b, h, f, v = B // DATA, H // MODEL, F // MODEL, V // MODEL
    S = P + T
    enc = 2 * b * S * E * 2 + 3 * b * S * h * D * 2 + b * h * S * S * 4 + 3 * b * S * f * 2
    dec = (3 * b * L * E * 2 + 4 * b * L * h * D * 2 + 2 * b * S * h * D * 2
           + b * h * L * L * 4 + b * h * L * S * 4 + 3 * b * L * f * 2)
    once = b * S * E * 2 + b * L * E * 2 + b * L * v * 4
    assert report.activations.device_bytes == N * enc + N * dec + once


def test_format_report(report):
    text = memory.format_report(report)
    assert "mesh (data=4, model=8), 32 devices" in text
    assert "frozen parameters" in text and "2.59 GiB" in text  # 2,784,707,584 bytes
    assert "optimizer state" in text and "total per device" in text


def test_model_tuning_factors_and_shards_the_optimizer_state():
    report = memory.memory_report(
        get_config("tiny", vocab_size=256, d_model=128, d_kv=32, num_heads=4, d_ff=256),
        (2, 4), prompt_length=0, trainable_regexes=(".*",), batch_size=8, input_length=16,
        target_length=4, frozen_dtype="float32", activation_dtype="float32")
    assert report.frozen_params.count == 0
    # Every matrix here is factored (both dims >= 128): per device, v_row/v_col of each
    # [in, out] kernel hold the unsharded dim whole and the sharded one / 4.
    assert report.optimizer_state.device_bytes < report.trainable_params.device_bytes / 20


def test_errors():
    config = get_config("tiny")
    with pytest.raises(ValueError, match="batch size=6 is not divisible by the data-parallel "
                                         r"size 4"):
        memory.memory_report(config, (4, 1), batch_size=6)
    with pytest.raises(ValueError, match="two positive sizes"):
        memory.memory_report(config, (-1, 1))
