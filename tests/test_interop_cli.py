"""Interop through the CLI: `export-peft`, `extract`, PROMPT_FILE of every kind, the
architecture taken from INITIAL_CHECKPOINT, and the reference's settings by name; every bad
input one line, a non-zero exit, nothing written lost."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    T5X_TINY,
    assert_one_line_error,
    run,
    shared_file,
    snapshot,
    t5x_with_prompt,
    tiny_config,
)

import prompt_jax
from prompt_jax import build, cli, optim, prompts
from prompt_jax.checkpoints import peft, prompt_artifacts, t5x


@pytest.fixture
def hf_dir(tmp_path):
    """A random tiny T5 as an HF directory (what `save_hf` writes, transformers reads)."""
    import jax

    from prompt_jax.t5.model import T5

    config = tiny_config(vocab_size=32128)
    tokens = np.ones((1, 2), np.int32)
    params = jax.tree.map(np.asarray, __import__("flax").linen.unbox(
        jax.jit(lambda r: T5(config).init(r, tokens, tokens)["params"])(
            jax.random.PRNGKey(0))))
    prompt_jax.save_hf(config, params, str(tmp_path / "hf"))
    return tmp_path / "hf", config


def test_export_peft_then_prompt_file_round_trip(tmp_path, capsys):
    prompt = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    prompts.save_prompt(str(tmp_path / "p.npy"), prompt)
    rc, out, err = run(capsys, "export-peft", str(tmp_path / "p.npy"), str(tmp_path / "adapter"),
                       "--base_model", "google/t5-small-lm-adapt")
    assert rc == 0, err
    assert "5 virtual tokens x 32" in out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"],
            config["token_dim"], config["num_transformer_submodules"],
            config["base_model_name_or_path"]) == ("PROMPT_TUNING", "SEQ_2_SEQ_LM", 5, 32, 1,
                                                   "google/t5-small-lm-adapt")
    np.testing.assert_array_equal(prompts.load_peft(str(tmp_path / "adapter")), prompt)
    np.testing.assert_array_equal(
        prompt_artifacts.load_prompt_artifact(str(tmp_path / "adapter"), 32), prompt)


def test_extract_like_the_reference(tmp_path, capsys):
    shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    prompt = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    ckpt = t5x_with_prompt(tmp_path / "pt", {"encoder/prompt/prompt/prompt": prompt})
    rc, out, err = run(capsys, "extract", str(ckpt), str(tmp_path / "rte.npy"))
    assert rc == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "rte.npy"), prompt)
    rc, out, err = run(capsys, "extract", str(ckpt), str(tmp_path / "scale.npy"),
                       "--variable", "target/decoder/decoder_norm/scale")
    assert rc == 0, err
    assert np.load(tmp_path / "scale.npy").shape == (4,)
    # The prompt inside the checkpoint is what PROMPT_FILE (or no PROMPT_FILE) resolves to.
    assert prompt_artifacts.holds_prompt(str(ckpt))
    assert build.default_prompt_file(str(ckpt), None) == str(ckpt)
    np.testing.assert_array_equal(prompt_artifacts.load_prompt_artifact(str(ckpt), 4), prompt)


def test_bad_interop_inputs_are_one_line_and_lose_nothing(tmp_path, capsys):
    shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    (tmp_path / "keep.txt").write_text("written before")
    before = snapshot(tmp_path)
    # extract: a variable that does not exist names the checkpoint and the closest names.
    rc, _, err = run(capsys, "extract", str(T5X_TINY), str(tmp_path / "x.npy"),
                     "--variable", "target/encoder/prompt/prompt/prompt")
    assert_one_line_error(rc, err, r"checkpoint_3", r"no variable")
    # export-peft of a t5x checkpoint that holds no prompt.
    rc, _, err = run(capsys, "export-peft", str(T5X_TINY), str(tmp_path / "adapter"))
    assert_one_line_error(rc, err, r"checkpoint_3", r"without a prompt")
    # An adapter of another peft_type, and one whose token_dim is not the model's d_model.
    prompt = np.zeros((4, 32), np.float32)
    peft.save_peft(prompt, str(tmp_path / "lora"))
    cfg_path = tmp_path / "lora" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match=r"adapter_config.json: peft_type is 'LORA'"):
        prompt_artifacts.load_prompt_artifact(str(tmp_path / "lora"), 32)
    peft.save_peft(prompt, str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"token_dim"):
        prompt_artifacts.load_prompt_artifact(str(tmp_path / "wide"), 64)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "adapter").exists()


def test_the_checkpoint_determines_the_architecture(hf_dir, tmp_path, capsys):
    """No size gin: the HF config.json says what the model is; a size that disagrees is
    refused naming the first difference; the infer job runs on the checkpoint alone."""
    directory, config = hf_dir
    found, _ = build.load_frozen(build.ModelSpec(dropout_rate=0.0), str(directory), None, 0)
    assert (found.d_model, found.num_encoder_layers, found.vocab_size) == (32, 2, 32128)
    with pytest.raises(ValueError, match=r"the checkpoint has d_model=32, but "
                                         r"ModelSpec.size='t5_1_1_small' has d_model=512"):
        build.load_frozen(build.ModelSpec(size="t5_1_1_small"), str(directory), None, 0)
    prompts.save_prompt(str(tmp_path / "p.npy"),
                        np.random.default_rng(1).normal(size=(3, 32)).astype(np.float32))
    (tmp_path / "in.jsonl").write_text(json.dumps({"inputs": "rte hypothesis: a. premise: b."})
                                       + "\n")
    rc, out, err = run(capsys, "infer", "--gin_file=runs/prompt_infer.gin",
                       f"--gin.INITIAL_CHECKPOINT='{directory}'",
                       f"--gin.PROMPT_FILE='{tmp_path / 'p.npy'}'",
                       f"--gin.INPUT_FILE='{tmp_path / 'in.jsonl'}'",
                       f"--gin.OUTPUT_FILE='{tmp_path / 'out.jsonl'}'", "--gin.BATCH_SIZE=1")
    assert rc == 0, err
    [record] = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {"inputs", "prediction", "score"} <= set(record)
    # A prompt of another width is refused naming the file and both widths.
    prompts.save_prompt(str(tmp_path / "wide.npy"), np.zeros((3, 64), np.float32))
    rc, _, err = run(capsys, "infer", "--gin_file=runs/prompt_infer.gin",
                     f"--gin.INITIAL_CHECKPOINT='{directory}'",
                     f"--gin.PROMPT_FILE='{tmp_path / 'wide.npy'}'",
                     f"--gin.INPUT_FILE='{tmp_path / 'in.jsonl'}'",
                     f"--gin.OUTPUT_FILE='{tmp_path / 'out2.jsonl'}'")
    assert_one_line_error(rc, err, r"wide.npy", r"\(3, 64\)", r"\[P, 32\]")


# ------------------------------------------------------------------ the reference's settings


def test_reference_uniform_and_the_papers_range():
    import jax

    rng = jax.random.PRNGKey(0)
    paper = np.asarray(prompts.random_uniform(0.5)(rng, (100, 64)))
    code = np.asarray(prompts.reference_uniform(0.5)(rng, (100, 64)))
    assert paper.min() < -0.4 and paper.max() > 0.4 and np.abs(paper).max() <= 0.5
    assert code.min() >= 0.0 and code.max() < 0.5 and code.mean() == pytest.approx(0.25, abs=0.02)
    assert build.PromptInit(kind="reference_uniform").kind == "reference_uniform"


def test_prompt_finetune_never_factors_the_prompt():
    """runs/prompt_finetune.gin: a [150, 768] prompt keeps a full second moment, as the
    reference's FactorDim.NONE; model tuning's big matrices stay factored."""
    import gin
    import jax

    cli.parse_gin("train", ["models/t5_1_1_prompt.gin", "runs/prompt_finetune.gin"],
                  ["MODEL_DIR='/tmp/unused'", "MIXTURE_OR_TASK_NAME='super_glue_rte'",
                   "INITIAL_CHECKPOINT='unused'"], "")
    tx = gin.get_configurable("adafactor")()
    state = jax.eval_shape(tx.init, {"prompt": jax.ShapeDtypeStruct((150, 768), np.float32)})
    shapes = {tuple(x.shape) for x in jax.tree.leaves(state)}
    assert (150, 768) in shapes and (150,) not in shapes and (768,) not in shapes
    cli.parse_gin("train", ["models/t5_1_1_prompt.gin", "runs/model_finetune.gin"],
                  ["MODEL_DIR='/tmp/unused'", "MIXTURE_OR_TASK_NAME='super_glue_rte'",
                   "INITIAL_CHECKPOINT='unused'"], "")
    tx = gin.get_configurable("adafactor")()
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((512, 1024), np.float32)})
    assert (512, 1024) not in {tuple(x.shape) for x in jax.tree.leaves(state)}


def test_step_offset_from_the_checkpoint():
    shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    assert t5x.checkpoint_step(str(T5X_TINY)) == 3
    assert optim.checkpoint_step_offset(str(T5X_TINY)) == -3
    with pytest.raises(ValueError, match="not a t5x checkpoint"):
        optim.checkpoint_step_offset("google/t5-base-lm-adapt")
    # beta2 at the first update is the reference's: 1 - (t + 1 - offset) ** -0.8 with t = 0.
    import jax.numpy as jnp

    tx = optim.adafactor(step_offset=-3, clipping_threshold=None, weight_decay_rate=None,
                         factored=False)
    p = {"w": jnp.ones((2, 2))}
    g = {"w": jnp.full((2, 2), 2.0)}
    update, _ = tx.update(g, tx.init(p), p)
    beta2 = 1 - 4.0 ** -0.8
    v = (1 - beta2) * (4.0 + 1e-30)
    np.testing.assert_allclose(np.asarray(update["w"]), -0.3 * 2.0 / np.sqrt(v), rtol=1e-5)
