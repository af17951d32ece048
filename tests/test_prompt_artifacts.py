"""One entry point for prompts: .npy files (float32/bfloat16/float16), PEFT adapters and
prompt-tuned t5x checkpoints load to float32 [P, E]; everything else is refused in one line."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from conftest import shared_file, t5x_with_prompt

from prompt_jax import prompts
from prompt_jax.checkpoints.prompt_artifacts import artifact_kind, describe, load_prompt_artifact
from prompt_jax.checkpoints.t5x import REFERENCE_PROMPT, SHARED_PROMPT, TASK_PROMPTS

P, E = 5, 4  # E is the tiny t5x checkpoint's d_model


@pytest.fixture
def prompt():
    # Values bfloat16 holds exactly, so that every dtype reads back the same numbers.
    values = np.random.default_rng(0).uniform(-0.5, 0.5, (P, E)).astype(np.float32)
    return values.astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_npy_dtypes_load_as_float32(tmp_path, prompt, dtype):
    path = tmp_path / "p.npy"
    np.save(path, prompt.astype(dtype))
    loaded = prompts.load_prompt(str(path), (P, E))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, prompt)
    np.testing.assert_array_equal(load_prompt_artifact(str(path), d_model=E), prompt)


def test_bfloat16_npy_is_what_the_reference_writes(tmp_path, prompt):
    # `extract_variable --restore_dtype=bfloat16` np.save's an ml_dtypes array: numpy
    # records a 2-byte void, and plain np.load returns raw bytes, not numbers.
    path = tmp_path / "bf16.npy"
    np.save(path, prompt.astype(ml_dtypes.bfloat16))
    assert b"'descr': '<V2'" in path.read_bytes()[:128]
    assert np.load(path).dtype.kind == "V"
    assert describe(str(path)) == f"{path}: .npy prompt [{P}, {E}] bfloat16"
    bad = prompt.astype(ml_dtypes.bfloat16)
    bad[0, 0] = np.nan
    np.save(path, bad)
    with pytest.raises(ValueError, match=r"bf16.npy: prompt holds 1 NaN/inf values"):
        prompts.load_prompt(str(path))


@pytest.mark.parametrize("array,match", [
    (np.zeros((P, E), np.uint8).view("V1"), r"prompt has dtype \|V1, expected a float array"),
    (np.zeros((P, E), [("a", "u1"), ("b", "u1")]), r"prompt has dtype \[\('a', 'u1'\), "
                                                   r"\('b', 'u1'\)\], expected a float array"),
    (np.full((P, E), 1e39), r"prompt holds 20 NaN/inf values \(as float32\)"),
], ids=["void1", "structured", "float64_overflow"])
def test_npy_that_is_not_a_float_prompt(tmp_path, array, match):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match="bad.npy: " + match):
        prompts.load_prompt(str(path))


def test_released_prompt_through_the_entry_point():
    path = shared_file("t5", "pretrained_prompts", "t5_1_1_lm100k_base", "rte.npy")
    assert artifact_kind(str(path)) == "npy"
    assert load_prompt_artifact(str(path), d_model=768).shape == (100, 768)


def test_every_kind_loads_the_same_prompt(tmp_path, prompt):
    np.save(tmp_path / "p.npy", prompt)
    prompts.save_peft(prompt, str(tmp_path / "adapter"))
    ckpt = t5x_with_prompt(tmp_path / "model" / "checkpoint_3", {REFERENCE_PROMPT: prompt})
    paths = {"npy": tmp_path / "p.npy", "peft": tmp_path / "adapter", "t5x": ckpt}
    for kind, path in paths.items():
        assert artifact_kind(str(path)) == kind
        np.testing.assert_array_equal(load_prompt_artifact(str(path), d_model=E), prompt)
    for path in (ckpt / "checkpoint", tmp_path / "model"):  # its file, its model dir
        assert artifact_kind(str(path)) == "t5x"
        np.testing.assert_array_equal(load_prompt_artifact(str(path)), prompt)

    assert describe(str(paths["npy"])) == f"{paths['npy']}: .npy prompt [{P}, {E}] float32"
    assert describe(str(paths["peft"])) == (f"{paths['peft']}: PEFT PROMPT_TUNING adapter, {P} "
                                            f"virtual tokens x {E} (task_type SEQ_2_SEQ_LM)")
    assert describe(str(tmp_path / "model")) == (
        f"{tmp_path / 'model'}: t5x checkpoint {ckpt} with prompt variables "
        f"target/{REFERENCE_PROMPT} [{P}, {E}]")


def test_d_model_is_checked_for_every_kind(tmp_path, prompt):
    np.save(tmp_path / "p.npy", prompt)
    prompts.save_peft(prompt, str(tmp_path / "adapter"))
    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {REFERENCE_PROMPT: prompt})
    with pytest.raises(ValueError, match=r"p.npy: prompt has shape \(5, 4\), expected \[P, 8\] "
                                         r"\(d_model of the frozen model\)"):
        load_prompt_artifact(str(tmp_path / "p.npy"), d_model=8)
    with pytest.raises(ValueError, match=r"adapter/adapter_config.json: token_dim is 4, "
                                         r"expected 8"):
        load_prompt_artifact(str(tmp_path / "adapter"), d_model=8)
    with pytest.raises(ValueError, match=r"checkpoint_3: prompt has shape \(5, 4\), expected "
                                         r"\[P, 8\]"):
        load_prompt_artifact(str(ckpt), d_model=8)


def test_t5x_without_a_prompt_is_refused():
    tiny = shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    assert describe(str(tiny)).endswith("without a prompt")
    with pytest.raises(ValueError, match=r"checkpoint_3: a t5x checkpoint without a prompt "
                                         r"\(no target/encoder/prompt/... variables\)"):
        load_prompt_artifact(str(tiny))


def test_multitask_checkpoint_points_to_t5x_prompts(tmp_path):
    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {
        SHARED_PROMPT: np.zeros((3, E), np.float32), TASK_PROMPTS: np.zeros((2, 3 * E),
                                                                             np.float32)})
    (tmp_path / "config.gin").write_text("PROMPT = @multitask_prompts.AddMultiTaskPrompt()\n")
    assert describe(str(ckpt)).endswith("with a multi-task prompt (shared_prompt [3, 4], 2 "
                                        "task prompts)")
    with pytest.raises(ValueError, match=r"checkpoint_3: a multi-task prompt checkpoint \(2 "
                                         r"task prompts\); pick one with .*t5x_prompts"):
        load_prompt_artifact(str(ckpt))


@pytest.mark.parametrize("make,error,match", [
    (lambda d: (d / "config.json").write_text("{}"), ValueError,
     r"a Hugging Face model directory \(config.json\), not a prompt"),
    (lambda d: None, ValueError, r"a directory with no adapter_config.json or t5x checkpoint"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM"})), ValueError,
     r"adapter_config.json: peft_type is 'LORA', expected PROMPT_TUNING or P_TUNING"),
], ids=["hf_model", "empty_dir", "lora"])
def test_directories_that_are_not_prompts(tmp_path, make, error, match):
    make(tmp_path)
    with pytest.raises(error, match=match) as caught:
        load_prompt_artifact(str(tmp_path))
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.npy: prompt artifact does not exist"):
        load_prompt_artifact(str(tmp_path / "nope.npy"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt: not a prompt artifact; a prompt is a .npy"):
        artifact_kind(str(tmp_path / "notes.txt"))
    (tmp_path / "fake.npy").write_text("hello")
    with pytest.raises(ValueError, match=r"fake.npy: not a .npy file"):
        load_prompt_artifact(str(tmp_path / "fake.npy"))
