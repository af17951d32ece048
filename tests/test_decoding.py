"""Greedy and beam search against Hugging Face `generate` on tiny random T5s."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import build_hf_model, padded_batch  # noqa: E402

import prompt_jax  # noqa: E402
from prompt_jax import decoding, serving  # noqa: E402
from prompt_jax.t5.model import T5  # noqa: E402

STEPS = 10
# Scales the EOS output row so that, in every test below, some hypotheses end early
# and others run to STEPS (the tied config scales `shared` row 1, its input too).
EOS_BOOST = {"t5_1_0_tied_relu": 10.0, "t5_1_1_untied_gated_gelu": 3.0}


_BUILT: dict = {}


def parity_models(name, tmp_path_factory):
    """(HF model, our model, our params) for one parity config, EOS made likelier."""
    if name not in _BUILT:
        path = tmp_path_factory.mktemp(name)
        hf = build_hf_model(name, path, seed=3)
        with torch.no_grad():
            hf.lm_head.weight[1] *= EOS_BOOST[name]
        hf.save_pretrained(path)
        config, params = prompt_jax.load_checkpoint(str(path))
        _BUILT[name] = hf, T5(config), params
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(EOS_BOOST))
def models(request, tmp_path_factory):
    return parity_models(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return parity_models("t5_1_1_untied_gated_gelu", tmp_path_factory)


@pytest.fixture(scope="module")
def inputs():
    return padded_batch(np.random.default_rng(2), [30, 11, 5, 17, 8, 22], 30)


def hf_generate(hf, enc, **kwargs):
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                          attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                          do_sample=False, max_new_tokens=STEPS, min_new_tokens=0,
                          eos_token_id=1, pad_token_id=0, decoder_start_token_id=0,
                          return_dict_in_generate=True, output_scores=True, **kwargs)
    return _after_eos_zero(out.sequences.numpy()[:, 1:]), out


def _after_eos_zero(tokens: np.ndarray) -> np.ndarray:
    """HF fills beam outputs after EOS with EOS (its pad id 0 is falsy); ours hold 0."""
    tokens = np.pad(tokens, ((0, 0), (0, STEPS - tokens.shape[1])))
    after = np.cumsum(tokens == 1, axis=1) - (tokens == 1) > 0
    return np.where(after, 0, tokens)


def test_greedy_matches_hf_generate(models, inputs):
    hf, model, params = models
    tokens, scores = decoding.greedy_decode(model, params, jnp.asarray(inputs), STEPS)
    ref, out = hf_generate(hf, inputs, num_beams=1)
    tokens = np.asarray(tokens)
    np.testing.assert_array_equal(tokens, ref)
    ended = (tokens == 1).any(axis=1)
    assert ended.any() and not ended.all()  # early EOS for some rows, the full length for others
    # Our score is the chosen tokens' summed log-probs.
    step_ll = torch.stack(out.scores, 1).log_softmax(-1).numpy()
    chosen = np.take_along_axis(step_ll, out.sequences.numpy()[:, 1:, None], -1)[..., 0]
    valid = ref[:, : chosen.shape[1]] > 0
    np.testing.assert_allclose(np.asarray(scores), (chosen * valid).sum(1), atol=1e-4)


@pytest.mark.parametrize("alpha,early_stopping", [
    (1.0, False), (0.6, True), (2.0, "never"), (-0.5, "never")])
def test_beam_search_matches_hf_generate(models, inputs, alpha, early_stopping):
    hf, model, params = models
    beams = 3  # the options are traced: one compilation serves every case
    tokens, scores = decoding.beam_search(
        model, params, jnp.asarray(inputs), STEPS, num_beams=beams, length_penalty=alpha,
        length_penalty_style="hf", early_stopping=early_stopping)
    ref, out = hf_generate(hf, inputs, num_beams=beams, num_return_sequences=beams,
                           length_penalty=alpha, early_stopping=early_stopping)
    batch = inputs.shape[0]
    np.testing.assert_array_equal(np.asarray(tokens), ref.reshape(batch, beams, STEPS))
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy().reshape(
        batch, beams), atol=1e-4, rtol=1e-5)
    ended = (np.asarray(tokens) == 1).any(axis=-1)
    assert ended.any() and not ended.all()


def test_beam_scores_are_penalised_teacher_forced_log_likelihoods(untied, inputs):
    """Every returned beam's score is its teacher-forced log-likelihood / the penalty."""
    _, model, params = untied
    for style, alpha in (("t5x", 0.6), ("hf", 0.0)):
        tokens, scores = decoding.beam_search(model, params, jnp.asarray(inputs), STEPS,
                                              num_beams=3, length_penalty=alpha,
                                              length_penalty_style=style)
        tokens = np.asarray(tokens)
        ll = np.asarray(serving.score_targets(model, params, jnp.asarray(inputs), tokens))
        lengths = (tokens > 0).sum(-1)
        penalty = lengths**alpha if style == "hf" else ((5 + lengths) / 6) ** alpha
        np.testing.assert_allclose(np.asarray(scores), ll / penalty, atol=1e-4, rtol=1e-5)
        assert (np.diff(np.asarray(scores), axis=1) <= 0).all()  # best first


def test_bad_beam_arguments(models, inputs):
    _, model, params = models
    with pytest.raises(ValueError, match="early_stopping"):
        decoding.beam_search(model, params, jnp.asarray(inputs), 4, early_stopping="sometimes")
    with pytest.raises(ValueError, match="length_penalty_style"):
        decoding.beam_search(model, params, jnp.asarray(inputs), 4, length_penalty_style="gnmt")
