"""Rank classification, mixed-task batches, prompt ensembles and nearest neighbours.

Every device call runs 6 rows of 12 tokens and prompts of length 5 or 2, so that the
few compiled programs are shared between tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import decoding, prompts, serving
from prompt_jax.t5.config import T5Config
from prompt_jax.t5.model import T5, abstract_params

V, E, STEPS = 120, 32, 6
CONFIG = T5Config(vocab_size=V, d_model=E, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                  num_decoder_layers=2, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, dropout_rate=0.0)
LABELS = [[17, 1], [40, 41, 1], [99, 1]]  # three label strings, tokenized, with EOS
LABELS_2D = jnp.asarray(serving.pad_candidates([LABELS])[0])  # [C, L], shared by all rows


@pytest.fixture(scope="module")
def frozen():
    """A random tiny T5, its params drawn in numpy (no compilation)."""
    model = T5(CONFIG)
    shapes = abstract_params(CONFIG)
    rng = np.random.default_rng(0)
    leaves, tree = jax.tree.flatten_with_path(shapes)
    params = [(1.0 + 0.1 * rng.normal(size=s.shape) if "scale" in jax.tree_util.keystr(path)
               else 0.3 * rng.normal(size=s.shape)).astype(np.float32) for path, s in leaves]
    return model, jax.tree.unflatten(tree, params)


def batch(lengths=(9, 4, 12, 3, 7, 10), seed=0):
    """6 rows of random ids (>= 2) ending in EOS, right-padded to 12."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), 12), np.int32)
    for row, n in enumerate(lengths):
        out[row, : n - 1] = rng.integers(2, V, n - 1)
        out[row, n - 1] = 1
    return jnp.asarray(out)


def random_prompts(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, E)).astype(np.float32) for n in lengths]


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_rank_classify_equals_scoring_each_candidate_alone(frozen):
    model, params = frozen
    enc, prompt = batch(), random_prompts([5])[0]
    targets = serving.pad_candidates([LABELS] * 6)
    choice, scores = serving.rank_classify(model, params, enc, jnp.asarray(targets), prompt)
    forward = jax.jit(lambda dec, tgt: model.apply({"params": params}, enc, dec, tgt,
                                                   prefix_embeddings=prompt))
    for c in range(len(LABELS)):
        tgt = targets[:, c]
        logits = forward(np.pad(tgt[:, :-1], ((0, 0), (1, 0))), tgt)
        ll = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tgt[..., None], -1)
        assert_close(np.asarray(scores)[:, c], (ll[..., 0] * (tgt > 0)).sum(1))
    np.testing.assert_array_equal(np.asarray(choice), np.asarray(scores).argmax(1))
    # Shared candidates [C, L] give the same as per-example [B, C, L].
    shared_choice, shared = serving.rank_classify(model, params, enc, LABELS_2D, prompt)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(scores), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(shared_choice), np.asarray(choice))


def test_padding_candidates_are_never_chosen(frozen):
    model, params = frozen
    targets = serving.pad_candidates([LABELS[:1]] + [LABELS] * 5)
    assert targets.shape == (6, 3, 3) and not targets[0, 1:].any()
    prompt = random_prompts([5])[0]
    choice, scores = serving.rank_classify(model, params, batch(), jnp.asarray(targets), prompt)
    assert np.isneginf(np.asarray(scores)[0, 1:]).all() and int(choice[0]) == 0
    assert np.isfinite(np.asarray(scores)[1:]).all()
    with pytest.raises(ValueError, match="more than length=2"):
        serving.pad_candidates([LABELS], length=2)


def test_pack_prompts_left_pads():
    ps = random_prompts([2, 4, 1])
    packed, mask = serving.pack_prompts(ps)
    assert packed.shape == (3, 4, E)
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    np.testing.assert_array_equal(packed[0, 2:], ps[0])
    assert not packed[0, :2].any()
    with pytest.raises(ValueError, match="one E"):
        serving.pack_prompts([ps[0], np.zeros((2, E + 1), np.float32)])


def test_mixed_task_batch_equals_each_task_alone(frozen):
    """Three tasks with prompts of lengths 5, 2, 5 in one batch give each task's outputs."""
    model, params = frozen
    ps, enc = random_prompts([5, 2, 5]), batch()
    task = np.array([2, 0, 1, 0, 2, 1])
    prefix, mask = serving.mixed_batch_prefix(*serving.pack_prompts(ps), task)
    tokens, scores = decoding.greedy_decode(model, params, enc, STEPS, prefix, mask)
    choice, ranks = serving.rank_classify(model, params, enc, LABELS_2D, prefix, mask)
    for t, prompt in enumerate(ps):
        rows = task == t  # each task alone: the whole batch under its prompt, its rows kept
        alone, alone_scores = decoding.greedy_decode(model, params, enc, STEPS, prompt)
        np.testing.assert_array_equal(np.asarray(tokens)[rows], np.asarray(alone)[rows])
        assert_close(np.asarray(scores)[rows], np.asarray(alone_scores)[rows])
        alone_choice, alone_ranks = serving.rank_classify(model, params, enc, LABELS_2D, prompt)
        np.testing.assert_array_equal(np.asarray(choice)[rows], np.asarray(alone_choice)[rows])
        assert_close(np.asarray(ranks)[rows], np.asarray(alone_ranks)[rows])
    assert len({tuple(r) for r in np.asarray(tokens)}) > 1  # the outputs are not all alike


def test_ensemble_rows_are_each_prompt_alone(frozen):
    """Row b*N + n of the one batched pass is example b under prompt n."""
    model, params = frozen
    ps, enc = np.stack(random_prompts([5, 5, 5], seed=5)), batch()[:2]
    tokens, scores = serving.ensemble_greedy_decode(model, params, enc, ps, STEPS)
    ranked = serving.ensemble_rank_classify(model, params, enc, LABELS_2D, ps)
    assert tokens.shape == (2, 3, STEPS) and ranked["scores"].shape == (2, 3, 3)
    rows, _ = serving.ensemble_rows(enc, 3)  # each example 3 times: the shapes compiled above
    for n, prompt in enumerate(ps):
        alone, alone_scores = decoding.greedy_decode(model, params, rows, STEPS, prompt)
        np.testing.assert_array_equal(np.asarray(tokens)[:, n], np.asarray(alone)[::3])
        assert_close(np.asarray(scores)[:, n], np.asarray(alone_scores)[::3])
        choice, alone_ranks = serving.rank_classify(model, params, rows, LABELS_2D, prompt)
        assert_close(np.asarray(ranked["scores"])[:, n], np.asarray(alone_ranks)[::3])
        np.testing.assert_array_equal(ranked["per_prompt"][:, n], np.asarray(choice)[::3])
    assert_close(ranked["mean_scores"], np.asarray(ranked["scores"]).mean(1))
    np.testing.assert_array_equal(ranked["mean_log_likelihood"],
                                  np.asarray(ranked["mean_scores"]).argmax(1))


def test_ensemble_of_copies_equals_the_prompt(frozen):
    model, params = frozen
    prompt, enc = random_prompts([5], seed=7)[0], batch(seed=3)[:2]
    copies = np.stack([prompt] * 3)
    tokens, scores = serving.ensemble_greedy_decode(model, params, enc, copies, STEPS)
    rows, _ = serving.ensemble_rows(enc, 3)
    alone, alone_scores = decoding.greedy_decode(model, params, rows, STEPS, prompt)
    voted, votes = serving.majority_vote(tokens)
    np.testing.assert_array_equal(voted, np.asarray(alone)[::3])
    np.testing.assert_array_equal(votes, 3)
    assert_close(scores, np.repeat(np.asarray(alone_scores)[::3, None], 3, 1))

    ranked = serving.ensemble_rank_classify(model, params, enc, LABELS_2D, copies)
    choice, alone_ranks = serving.rank_classify(model, params, rows, LABELS_2D, prompt)
    choice, alone_ranks = np.asarray(choice)[::3], np.asarray(alone_ranks)[::3]
    for key in ("majority_vote", "mean_log_likelihood"):
        np.testing.assert_array_equal(np.asarray(ranked[key]), choice)
    assert_close(ranked["mean_scores"], alone_ranks)

    accuracy = lambda targets, preds: {"accuracy": float(np.mean(np.equal(targets, preds)))}
    gold = choice.copy()
    gold[0] = (gold[0] + 1) % 3  # one mistake in two: accuracy 0.5 everywhere
    ensembles = {k: ranked[k] for k in ("majority_vote", "mean_log_likelihood")}
    report = serving.ensemble_report(accuracy, gold, ranked["per_prompt"], ensembles)
    assert set(report) == {"prompt_0", "prompt_1", "prompt_2", "prompt_mean", "prompt_best",
                           "majority_vote", "mean_log_likelihood"}
    assert all(r == {"accuracy": pytest.approx(0.5)} for r in report.values())


def test_ensemble_report_per_prompt_mean_best_and_ensemble():
    accuracy = lambda targets, preds: {"accuracy": float(np.mean(np.equal(targets, preds)))}
    per_prompt = [["a", "a", "b"], ["b", "b", "b"], ["c", "a", "c"], ["d", "d", "d"]]
    gold = ["a", "b", "c", "x"]
    voted, _ = serving.majority_vote(np.array(per_prompt))
    report = serving.ensemble_report(accuracy, gold, per_prompt, {"majority_vote": voted})
    assert [report[f"prompt_{n}"]["accuracy"] for n in range(3)] == [0.75, 0.5, 0.5]
    assert report["prompt_mean"]["accuracy"] == pytest.approx(7 / 12)
    assert report["prompt_best"]["accuracy"] == 0.75
    assert report["majority_vote"]["accuracy"] == 0.75


def test_majority_vote_ties_go_to_the_lowest_prompt():
    labels = np.array([["b", "a", "a", "b"], ["x", "y", "z", "y"], ["q", "r", "s", "t"]])
    voted, votes = serving.majority_vote(labels)
    np.testing.assert_array_equal(voted, ["b", "y", "q"])
    np.testing.assert_array_equal(votes, [2, 2, 1])
    seqs = np.array([[[5, 1, 0], [6, 1, 0], [6, 1, 0]], [[7, 8, 1], [7, 9, 1], [7, 8, 1]]])
    voted, votes = serving.majority_vote(seqs)
    np.testing.assert_array_equal(voted, [[6, 1, 0], [7, 8, 1]])
    np.testing.assert_array_equal(votes, [2, 2])


def test_nearest_neighbours_of_a_string_prompt_are_its_tokens(vocab_path):
    seqio = pytest.importorskip("seqio")
    vocab = seqio.SentencePieceVocabulary(str(vocab_path), extra_ids=100)
    embedding = np.random.default_rng(0).normal(size=(32128, E)).astype(np.float32)
    text = "Classify whether the premise entails the hypothesis"
    ids = list(vocab.encode(text))
    prompt = prompts.from_string(embedding, vocab, text)(jax.random.PRNGKey(0),
                                                         (len(ids) + 2, E))
    nn_ids, sims = serving.nearest_neighbours(prompt, embedding, k=3)
    assert nn_ids.shape == sims.shape == (len(ids) + 2, 3)
    np.testing.assert_array_equal(nn_ids[: len(ids), 0], ids)
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()
    lines = serving.format_neighbours(nn_ids, sims, vocab).splitlines()
    assert len(lines) == len(ids) + 3 and lines[0].split()[:3] == ["pos", "neighbour", "1"]
    for line, i in zip(lines[1:], ids, strict=False):
        assert line.split()[1:3] == [vocab.tokenizer.id_to_piece(i), "(1.000)"]


def test_format_neighbours_with_a_piece_function():
    ids = np.array([[3, 32120], [7, 3]])
    sims = np.array([[0.91, 0.5], [0.8, -0.25]])
    table = serving.format_neighbours(ids, sims, lambda i: f"tok{i}")
    assert table.splitlines()[1].split() == ["0", "tok3", "(0.910)", "tok32120", "(0.500)"]
    assert "tok3 (-0.250)" in table


def test_nearest_neighbours_checks_shapes():
    with pytest.raises(ValueError, match="one E"):
        serving.nearest_neighbours(np.zeros((2, 4)), np.zeros((10, 5)))
