"""Our T5 against Hugging Face's PyTorch T5ForConditionalGeneration.

Random tiny models are written with `save_pretrained` and read back by our
loader; encoder outputs and logits must agree within 1e-4 (fp32), the loss
must agree, and greedy decoding must give the same tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import CONFIGS, build_hf_model, padded_batch, shift_right  # noqa: E402

import prompt_jax  # noqa: E402
from prompt_jax import decoding  # noqa: E402
from prompt_jax.t5.layers import relative_position_bucket  # noqa: E402
from prompt_jax.t5.model import T5  # noqa: E402


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_hf(name, tmp_path):
    hf = build_hf_model(name, tmp_path)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    assert config.tie_embeddings == CONFIGS[name]["tie_word_embeddings"]

    rng = np.random.default_rng(1)
    enc = padded_batch(rng, [37, 12, 3, 25], 40)
    tgt = padded_batch(rng, [9, 4, 1, 6], 9)
    dec = shift_right(tgt)

    model = T5(config)
    encoded, enc_mask = model.apply({"params": params}, enc, method=T5.encode)
    logits = model.apply({"params": params}, enc, dec, tgt)

    labels = torch.tensor(np.where(tgt > 0, tgt, -100), dtype=torch.long)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(enc, dtype=torch.long),
                 attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long), labels=labels)

    valid_enc = enc > 0
    np.testing.assert_array_equal(np.asarray(enc_mask), valid_enc)
    np.testing.assert_allclose(np.asarray(encoded)[valid_enc],
                               out.encoder_last_hidden_state.numpy()[valid_enc], atol=1e-4)
    valid_tgt = tgt > 0
    np.testing.assert_allclose(np.asarray(logits)[valid_tgt], out.logits.numpy()[valid_tgt],
                               atol=1e-4, rtol=1e-4)

    # HF's loss is the mean token cross-entropy over non-ignored targets.
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    token_ll = np.take_along_axis(np.asarray(log_probs), tgt[..., None], axis=-1)[..., 0]
    ours = -(token_ll * valid_tgt).sum() / valid_tgt.sum()
    np.testing.assert_allclose(ours, out.loss.item(), rtol=1e-5)


@pytest.mark.parametrize("name", ["t5_1_0_tied_relu", "deep_padded_log_buckets"])
def test_greedy_decoding_matches_hf_generate(name, tmp_path):
    hf = build_hf_model(name, tmp_path, seed=3)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    rng = np.random.default_rng(2)
    enc = padded_batch(rng, [30, 11, 5], 30)
    steps = 12
    tokens, _ = decoding.greedy_decode(T5(config), params, jnp.asarray(enc), steps)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                          attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                          do_sample=False, num_beams=1, max_new_tokens=steps, min_new_tokens=0,
                          eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    ref = ref.numpy()[:, 1:]  # drop the start token
    ref = np.pad(ref, ((0, 0), (0, steps - ref.shape[1])))
    np.testing.assert_array_equal(np.asarray(tokens), ref)


def test_relative_position_buckets_match_hf():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :] * np.ones((1, 1), np.int64)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (4, 8)):
            ref = T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
                max_distance=distance).numpy()
            ours = relative_position_bucket(rel, bidirectional, buckets, distance)
            np.testing.assert_array_equal(ours, ref)


def test_hf_round_trip_is_exact(tmp_path):
    build_hf_model("t5_1_1_untied_gated_gelu", tmp_path / "a")
    config, params = prompt_jax.load_checkpoint(str(tmp_path / "a"))
    prompt_jax.save_hf(config, params, str(tmp_path / "b"))
    config2, params2 = prompt_jax.load_checkpoint(str(tmp_path / "b"))
    assert config2 == config
    flat = jax.tree_util.tree_leaves_with_path(params)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    assert len(flat) == len(flat2)
    for path, value in flat:
        np.testing.assert_array_equal(flat2[path], value)
    # ... and transformers reads what we wrote.
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "b"))
    np.testing.assert_array_equal(hf.lm_head.weight.detach().numpy(),
                                  params["decoder"]["logits_dense"]["kernel"].T)
