"""Greedy and beam search against Hugging Face `generate` on tiny random T5s; sampling's
reproducibility, truncation and distribution; the cross-attention cache."""

from __future__ import annotations

import jax
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


# ------------------------------------------------------------- sampling

def first_step_log_probs(model, params, enc):
    """The model's log-probs [B, V] of the first decoded token."""
    encoded, mask = model.apply({"params": params}, enc, method=T5.encode)
    cache = decoding.init_cache(model, params, encoded, mask, 1)
    log_probs, _ = decoding.decode_step(model, params, cache, encoded, mask,
                                        jnp.zeros(enc.shape[:1], jnp.int32))
    return np.asarray(log_probs, np.float64)


def one_step_draws(model, params, enc_row, draws, **options):
    """`draws` first tokens sampled for one input (rows of seeds 0 .. draws-1) -> counts [V]."""
    enc = jnp.asarray(np.repeat(enc_row[None], draws, axis=0))
    tokens, _ = decoding.sample_decode(model, params, enc, 1, seed=jnp.arange(draws), **options)
    return np.bincount(np.asarray(tokens)[:, 0], minlength=model.config.vocab_size)


def chi_square(counts, probs):
    """Pearson's statistic and its degrees of freedom; tokens expected < 5 times are pooled."""
    expected = counts.sum() * probs
    rare = expected < 5
    observed = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    return ((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum(), len(observed) - 1


def test_sampling_at_temperature_zero_or_top_k_one_is_greedy(models, inputs):
    _, model, params = models
    enc = jnp.asarray(inputs)
    greedy, greedy_scores = decoding.greedy_decode(model, params, enc, STEPS)
    rows = jnp.arange(inputs.shape[0])
    for options in (dict(temperature=0.0), dict(top_k=1, seed=rows),
                    dict(top_p=1e-6, temperature=0.7, seed=rows)):
        tokens, scores = decoding.sample_decode(model, params, enc, STEPS, **options)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy), err_msg=options)
        np.testing.assert_allclose(np.asarray(scores), np.asarray(greedy_scores), atol=1e-6)
    # Per-row settings: the greedy rows stay greedy beside sampled ones.
    temperature = jnp.where(rows % 2 == 0, 0.0, 1.0)
    tokens, _ = decoding.sample_decode(model, params, enc, STEPS, temperature=temperature,
                                       seed=rows)
    np.testing.assert_array_equal(np.asarray(tokens)[::2], np.asarray(greedy)[::2])
    assert (np.asarray(tokens)[1::2] != np.asarray(greedy)[1::2]).any()  # the control


def test_sampling_is_reproducible_and_a_row_ignores_its_batch(untied, inputs):
    _, model, params = untied
    enc = jnp.asarray(inputs)
    seeds = jnp.array([11, 12, 13, 14, 15, 16])
    options = dict(temperature=1.5, top_k=40, top_p=0.95)
    tokens, scores = decoding.sample_decode(model, params, enc, STEPS, seed=seeds, **options)
    again, again_scores = decoding.sample_decode(model, params, enc, STEPS, seed=seeds, **options)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(again_scores), np.asarray(scores))
    # Row 2 alone, and first in a reversed batch: the same tokens.
    alone, alone_score = decoding.sample_decode(model, params, enc[2:3], STEPS, seed=13, **options)
    np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(tokens)[2])
    # The score sums STEPS log-probs in float32: a batch of 1 and of 6 block the matmuls
    # differently, so allow a few ulps of the sum (|-35| * 1e-6 ~ 9 ulps), not bit-equality.
    np.testing.assert_allclose(np.asarray(alone_score)[0], np.asarray(scores)[2],
                               rtol=1e-6, atol=1e-5)
    flipped, _ = decoding.sample_decode(model, params, enc[::-1], STEPS, seed=seeds[::-1],
                                        **options)
    np.testing.assert_array_equal(np.asarray(flipped)[::-1], np.asarray(tokens))
    # The control: other seeds draw other tokens; the score is the model's log-likelihood.
    other, _ = decoding.sample_decode(model, params, enc, STEPS, seed=seeds + 100, **options)
    assert (np.asarray(other) != np.asarray(tokens)).any()
    ll = serving.score_targets(model, params, enc, tokens[:, None])[:, 0]
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ll), atol=1e-4, rtol=1e-5)


def test_top_k_and_top_p_restrict_the_support(untied, inputs):
    _, model, params = untied
    probs = np.exp(first_step_log_probs(model, params, jnp.asarray(inputs[:1]))[0])
    order = np.argsort(-probs)
    # By hand: the top-p set is the shortest run of the most likely tokens holding top_p.
    nucleus = lambda p, top_p: set(order[: np.searchsorted(np.cumsum(p[order]), top_p) + 1])
    top_k = set(order[:5])
    renormalised = np.where(np.isin(np.arange(len(probs)), order[:5]), probs, 0.0)
    renormalised /= renormalised.sum()
    cases = [(dict(top_k=5), top_k), (dict(top_p=0.5), nucleus(probs, 0.5)),
             (dict(top_k=5, top_p=0.6), nucleus(renormalised, 0.6))]
    assert len({frozenset(s) for _, s in cases}) == 3 and all(len(s) > 1 for _, s in cases)
    for options, support in cases:
        counts = one_step_draws(model, params, inputs[0], 2000, **options)
        assert set(np.flatnonzero(counts)) == support, options


def test_draws_follow_the_tempered_softmax(untied, inputs):
    """2000 one-token draws from one input at temperatures 1 and 2 against both softmaxes:
    each passes its own distribution's chi-square bound and fails the other's."""
    _, model, params = untied
    log_probs = first_step_log_probs(model, params, jnp.asarray(inputs[:1]))[0]
    softmax = lambda t: np.exp(log_probs / t) / np.exp(log_probs / t).sum()
    counts = {t: one_step_draws(model, params, inputs[0], 2000, temperature=t) for t in (1.0, 2.0)}
    for drawn in (1.0, 2.0):
        for against in (1.0, 2.0):
            stat, dof = chi_square(counts[drawn], softmax(against))
            bound = dof + 5 * np.sqrt(2 * dof)  # far in the tail of chi-square(dof)
            assert (stat < bound) == (drawn == against), (drawn, against, stat, dof)


# ------------------------------------------------------------- the cross-attention cache

def dot_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The left operands' shapes of every dot_general in a jaxpr and its sub-jaxprs."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.invars[0].aval.shape))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes += dot_operand_shapes(sub)
    return shapes


def test_a_decode_step_projects_nothing_of_the_encoder_output(untied, inputs):
    """The cross-attention keys and values are made once, in `init_cache`; a step reads them."""
    _, model, params = untied
    cfg = model.config
    encoded, mask = model.apply({"params": params}, jnp.asarray(inputs), method=T5.encode)
    cache = decoding.init_cache(model, params, encoded, mask, STEPS)
    previous = jnp.zeros(inputs.shape[:1], jnp.int32)
    step = jax.make_jaxpr(decoding.decode_step, static_argnums=0)(model, params, cache, encoded,
                                                                 mask, previous)
    shapes = dot_operand_shapes(step.jaxpr)
    assert len(shapes) > 4 * cfg.num_decoder_layers and encoded.shape not in shapes
    init = jax.make_jaxpr(decoding.init_cache, static_argnums=(0, 4))(model, params, encoded,
                                                                     mask, STEPS)
    projections = dot_operand_shapes(init.jaxpr).count(encoded.shape)
    assert projections == 2 * cfg.num_decoder_layers  # the control: the counter sees them
    # What XLA compiles of `init_cache` is those projections alone (the dummy decoder call
    # that creates the cache is dropped), and the cache holds them.
    compiled = jax.jit(decoding.init_cache, static_argnums=(0, 4)).lower(
        model, params, encoded, mask, STEPS).compile().as_text()
    assert compiled.count(" dot(") == 2 * cfg.num_decoder_layers
    for i in range(cfg.num_decoder_layers):
        cross = cache["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
        kernels = params["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
        for name in ("key", "value"):
            held = np.asarray(cross[f"cached_cross_{name}"])
            expected = np.asarray(encoded @ kernels[name]["kernel"]).reshape(held.shape)
            np.testing.assert_allclose(held, expected, atol=1e-5)
