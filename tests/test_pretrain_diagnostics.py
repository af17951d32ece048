"""The diagnostics scripts/pretrain_tiny.py writes into each in-house model's REPORT.md:
`task_probe` (a linear readout of the frozen encoder) and `encoder_use` (how much the decoder
reads its encoder), on random tiny models and hand-made data."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, save_random_backbone

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import pretrain_tiny  # noqa: E402  (scripts/ is not a package)

DEMO_DATA = REPO_ROOT / "prompt_jax" / "demo_data"
VOCAB = str(DEMO_DATA / "spiece.model")
FILLER = ("the", "a", "film", "story", "of", "and", "with", "its", "an", "actor", "long", "old",
          "music", "scene", "house", "night", "day", "city")


def write_sst2(root, rng: np.random.Generator, decided_by_a_word: bool) -> str:
    """glue/SST-2/{train,dev}.tsv under `root`: five filler words and, at a random place,
    'good' or 'bad'; the label is the word's (or, `decided_by_a_word=False`, a coin flip)."""
    directory = root / "glue" / "SST-2"
    directory.mkdir(parents=True)
    for name, rows in (("train.tsv", 400), ("dev.tsv", 200)):
        lines = ["sentence\tlabel"]
        for _ in range(rows):
            positive = bool(rng.integers(2))
            words = list(rng.choice(FILLER, 5))
            words.insert(int(rng.integers(6)), "good" if positive else "bad")
            label = positive if decided_by_a_word else bool(rng.integers(2))
            lines.append(f"{' '.join(words)}\t{int(label)}")
        (directory / name).write_text("\n".join(lines) + "\n")
    return str(root)


def test_task_probe_reads_a_deciding_word_and_not_a_coin_flip(tmp_path):
    """A random encoder's averaged outputs carry which of two words an input holds: the probe
    reads it (validation >= 0.75; 0.82-0.93 over seeds 0-3). With labels that no input
    feature decides, it cannot beat chance on held-out rows (<= 0.65; 0.47-0.58), however
    well it fits the training rows. The majority rate is the dev file's."""
    rng = np.random.default_rng(0)
    save_random_backbone(tmp_path / "t5", rng)
    decided = pretrain_tiny.task_probe(str(tmp_path / "t5"),
                                       write_sst2(tmp_path / "decided", rng, True), VOCAB)
    assert decided["validation"] >= 0.75, decided
    coin = pretrain_tiny.task_probe(str(tmp_path / "t5"),
                                    write_sst2(tmp_path / "coin", rng, False), VOCAB)
    assert coin["validation"] <= 0.65, coin
    for name, result in (("decided", decided), ("coin", coin)):
        labels = np.loadtxt(tmp_path / name / "glue" / "SST-2" / "dev.tsv", dtype=str,
                            delimiter="\t", skiprows=1)[:, 1].astype(int)
        assert result["majority"] == pytest.approx(max(labels.mean(), 1 - labels.mean()))


def test_encoder_use_gap_is_zero_exactly_when_the_decoder_cannot_see_the_encoder(tmp_path):
    """`encoder_use` swaps each example's inputs for the next one's: a random model's loss
    changes; with every cross-attention output projection zeroed it cannot (gap 0)."""
    import jax
    from prompt_jax.tasks.sources import TRAINING_TEXTS

    from prompt_jax.checkpoints import load_checkpoint, save_hf

    save_random_backbone(tmp_path / "t5", np.random.default_rng(0))
    config, params = load_checkpoint(str(tmp_path / "t5"))

    def blind(path, leaf):
        keys = jax.tree_util.keystr(path)
        return np.zeros_like(leaf) if "encoder_decoder_attention']['out" in keys else leaf

    save_hf(config, jax.tree.map_with_path(blind, params), str(tmp_path / "blind"))
    environment = dict(os.environ)
    reads = {name: pretrain_tiny.encoder_use(str(tmp_path / name), str(DEMO_DATA), TRAINING_TEXTS,
                                             VOCAB, examples=16, chunk=8)
             for name in ("t5", "blind")}
    gaps = {name: by["another example's inputs"] - by["own inputs"] for name, by in reads.items()}
    assert abs(gaps["blind"]) < 1e-6, reads
    assert abs(gaps["t5"]) > 1e-3, reads
    assert dict(os.environ) == environment  # the data it pointed the readers at is not left


def test_a_stage_stopped_before_its_last_step_stops_the_recipe(tmp_path, monkeypatch):
    """The train job exits 0 when SIGTERM stops it; `stage` then finds no export and exits
    with BUDGET_SPENT (run again to go on) instead of handing the next stage a model that
    does not exist. A finished stage (its export written) is reused without training."""
    calls = []
    monkeypatch.setattr(pretrain_tiny, "prompt_jax", lambda *args: calls.append(args))
    model_dir = tmp_path / "span_corruption"
    with pytest.raises(SystemExit) as stopped:
        pretrain_tiny.stage("span corruption", "runs/pretrain_span_corruption.gin",
                            str(model_dir), 10, 2, [], [])
    assert stopped.value.code == pretrain_tiny.BUDGET_SPENT and len(calls) == 1
    (model_dir / "hf_export").mkdir(parents=True)
    (model_dir / "hf_export" / "model.safetensors").write_bytes(b"")
    assert pretrain_tiny.stage("span corruption", "runs/pretrain_span_corruption.gin",
                               str(model_dir), 10, 2, [], []) == str(model_dir / "hf_export")
    assert len(calls) == 1


def test_stage_lengths_reach_the_train_job_and_the_heldout_measures(tmp_path, monkeypatch):
    """--span_lengths / --lm_lengths: each stage trains at its lengths, its held-out loss is
    measured at them (a model trained on 64-token inputs is not scored on 128), and a result
    measured at other lengths is never reused (the eval dir is keyed by them)."""
    import argparse

    from prompt_jax.model_dir import eval_results, write_json

    assert pretrain_tiny.feature_lengths("64,16") == {"inputs": 64, "targets": 16}
    for bad in ("64", "64,16,2", "a,b", "1,8", "64,0"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            pretrain_tiny.feature_lengths(bad)
    args = argparse.Namespace(span_lengths={"inputs": 64, "targets": 16}, lm_lengths=None)
    lengths = pretrain_tiny.heldout_lengths(args)
    assert lengths == {"span_corruption": {"inputs": 64, "targets": 16},
                       "lm_adaptation": pretrain_tiny.HELDOUT["lm_adaptation"]}
    dirs = {pretrain_tiny.heldout_dir("w", "lm", "span_corruption", n)
            for n in ({"inputs": 64, "targets": 16}, {"inputs": 64, "targets": 8},
                      pretrain_tiny.HELDOUT["span_corruption"])}
    assert dirs == {os.path.join("w", "eval_lm_span_corruption_64x16"),
                    os.path.join("w", "eval_lm_span_corruption_64x8"),
                    os.path.join("w", "eval_lm_span_corruption")}

    calls = []
    monkeypatch.setattr(pretrain_tiny, "prompt_jax", lambda *a: calls.append(a))
    with pytest.raises(SystemExit):  # the stub writes no export: the stage stops there
        pretrain_tiny.stage("span corruption", "runs/pretrain_span_corruption.gin",
                            str(tmp_path / "s"), 10, 2,
                            pretrain_tiny.lengths_flag(lengths["span_corruption"]), [])
    assert "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}" in calls[0]

    def eval_job(*a):  # what `prompt-jax eval` leaves: the split's result in MODEL_DIR
        calls.append(a)
        write_json(eval_results(str(tmp_path / "e"), "validation"), {"metrics": {"loss": 1.5}})

    monkeypatch.setattr(pretrain_tiny, "prompt_jax", eval_job)
    assert pretrain_tiny.heldout_loss("ckpt", str(tmp_path / "e"), [], "inhouse_tiny",
                                      "span_corruption", lengths["span_corruption"]) == 1.5
    assert "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}" in calls[1]


def test_only_inhouse_tiny_writes_the_bundled_backbone_by_default():
    """Without --out, `--size inhouse_small` writes <work_dir>/model (where the reproduction
    scripts look), not over the bundled inhouse_tiny model the demo and tests load."""
    bundled = str(DEMO_DATA / "inhouse_tiny_t5")
    assert pretrain_tiny.default_out("inhouse_tiny", "w") == bundled
    for size in ("inhouse_mini", "inhouse_small", "inhouse_base"):
        assert pretrain_tiny.default_out(size, "w") == os.path.join("w", "model")
