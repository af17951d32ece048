"""TaskEvaluator against hand computations: the per-token loss, rank accuracy, the eval
lengths (whole inputs unless truncation is asked for), and the same results on a mesh."""

from __future__ import annotations

import flax
import jax
import numpy as np
import pytest
from conftest import tiny_config
from prompt_jax.tasks import config as task_config

from prompt_jax import build, partitioning, rank_classification
from prompt_jax.evaluation import TaskEvaluator, batches
from prompt_jax.t5.model import T5

LENGTHS = {"inputs": 24, "targets": 8}
N = 12  # examples of the bundled RTE validation slice


@pytest.fixture(autouse=True)
def _demo_data(monkeypatch):
    monkeypatch.setenv(task_config.DATA_DIR_ENV, build.demo_path(""))


@pytest.fixture(scope="module")
def model_and_params():
    config = tiny_config(vocab_size=32128)
    model = T5(config)
    tokens = np.ones((1, 2), np.int32)
    params = flax.linen.unbox(jax.jit(lambda r: model.init(r, tokens, tokens)["params"])(
        jax.random.PRNGKey(3)))
    return model, params


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_and_rank_accuracy_by_hand(model_and_params, monkeypatch):
    model, params = model_and_params
    evaluator = TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 4, num_examples=N)
    results = evaluator.evaluate(params)["super_glue_rte"]
    assert {"accuracy", "rank_accuracy", "loss"} <= set(results)

    # The loss: every example's teacher-forced log-likelihood, summed by hand, per token.
    total, count = 0.0, 0
    rows = []
    apply = jax.jit(model.apply)  # the model's logits: one compile per shape, not op by op
    for _, features, n in batches(evaluator.loss_datasets["super_glue_rte"], 4):
        logits = np.asarray(apply({"params": params}, features["encoder_input_tokens"],
                                  features["decoder_input_tokens"],
                                  features["decoder_target_tokens"]), np.float64)
        log_probs = _log_softmax(logits)
        for i in range(n):
            targets = features["decoder_target_tokens"][i]
            total += sum(log_probs[i, t, targets[t]] for t in range(len(targets))
                         if targets[t] > 0)
            count += int((targets > 0).sum())
            rows.append(features["encoder_input_tokens"][i])
    assert len(rows) == N
    assert results["loss"] == pytest.approx(-total / count, rel=1e-5)

    # Rank accuracy: each label as a full teacher-forced target, argmax against the gold.
    found = rank_classification.candidates("super_glue_rte", LENGTHS["targets"])
    gold = evaluator.ranked["super_glue_rte"][1]
    correct = 0
    for i, enc in enumerate(rows):
        scores = []
        for cand in found.tokens:
            dec = np.concatenate([[0], cand[:-1]])[None]
            logits = np.asarray(apply({"params": params}, enc[None], dec, cand[None]),
                                np.float64)
            lp = _log_softmax(logits)[0]
            scores.append(sum(lp[t, cand[t]] for t in range(len(cand)) if cand[t] > 0))
        correct += int(np.argmax(scores) == gold[i])
    assert results["rank_accuracy"] == pytest.approx(100.0 * correct / N)


def test_eval_inputs_are_whole_unless_truncation_is_asked(model_and_params):
    model, _ = model_and_params
    whole = TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 4, num_examples=N)
    cut = TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 4, num_examples=N,
                        truncate_inputs=True)
    assert whole.stats.longest_inputs > LENGTHS["inputs"]  # the slice has longer inputs
    assert whole.lengths["inputs"] == whole.stats.longest_inputs
    assert cut.lengths["inputs"] == LENGTHS["inputs"]
    widths = {f["encoder_input_tokens"].shape[1]
              for _, f, _ in batches(whole.loss_datasets["super_glue_rte"], 4)}
    assert widths == {whole.stats.longest_inputs}


def test_same_results_on_a_mesh(model_and_params):
    model, params = model_and_params
    alone = TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 4, num_examples=N)
    mesh = partitioning.make_mesh((1, 1))
    placed = build.place_params(model.config, jax.tree.map(np.asarray, params), mesh)
    on_mesh = TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 4, mesh=mesh,
                            num_examples=N)
    a, b = alone.evaluate(params), on_mesh.evaluate(placed)
    assert a["super_glue_rte"].keys() == b["super_glue_rte"].keys()
    for k, v in a["super_glue_rte"].items():
        assert b["super_glue_rte"][k] == pytest.approx(v, rel=1e-5), k
    with pytest.raises(ValueError, match="eval batch size=3 is not divisible"):
        TaskEvaluator(model, "super_glue_rte", "validation", LENGTHS, 3,
                      mesh=_fake_mesh_of(2), num_examples=N)


def _fake_mesh_of(data: int):
    class Mesh:
        shape = {"data": data, "model": 1}

    return Mesh()
