"""Checkpoint readers: the t5x-written tiny checkpoint, HF directories, bad inputs."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_file, t5x_with_prompt

import prompt_jax
from prompt_jax.checkpoints.tree import expected_shapes
from prompt_jax.pytree import flatten
from prompt_jax.t5.model import T5


@pytest.fixture
def t5x_tiny():
    return shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")


def test_t5x_tiny_checkpoint_loads_completely(t5x_tiny):
    from flax import serialization

    config, params = prompt_jax.load_checkpoint(str(t5x_tiny))
    # The shapes t5x's test config gives it (prompt-tuning's configs/test/t5_1_1_tiny.gin).
    assert (config.d_model, config.num_heads, config.d_kv, config.d_ff) == (4, 2, 2, 8)
    assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 2)
    assert config.relative_attention_num_buckets == 4 and config.vocab_size == 32128
    assert config.gated_gelu and not config.tie_embeddings

    # Every parameter the checkpoint's target holds is used, and nothing else.
    raw = serialization.msgpack_restore((t5x_tiny / "checkpoint").read_bytes())
    target_paths = set()

    def walk(node, prefix):
        if isinstance(node, dict) and "driver" not in node:
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else k)
        else:
            target_paths.add(prefix)

    walk(raw["optimizer"]["target"], "")
    assert set(flatten(params)) == target_paths == set(expected_shapes(config))

    # Values are those of the zarr arrays / inlined leaves.
    np.testing.assert_array_equal(params["decoder"]["decoder_norm"]["scale"],
                                  raw["optimizer"]["target"]["decoder"]["decoder_norm"]["scale"])
    kernel = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert kernel.shape == (4, 4) and np.isfinite(kernel).all() and np.abs(kernel).sum() > 0

    enc = jnp.array([[71, 8, 1, 0], [3, 5, 19, 1]])
    tgt = jnp.array([[9, 1, 0], [4, 2, 1]])
    dec = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tgt[:, :-1]], axis=1)
    logits = T5(config).apply({"params": params}, enc, dec, tgt)
    assert logits.shape == (2, 3, 32128) and np.isfinite(np.asarray(logits)).all()


def test_t5x_tiny_matches_hf_after_conversion(t5x_tiny, tmp_path):
    """The t5x-written weights, converted with save_hf, give HF's PyTorch T5 our logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = prompt_jax.load_checkpoint(str(t5x_tiny))
    prompt_jax.save_hf(config.replace(dropout_rate=0.0), params, str(tmp_path))
    hf = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()

    enc = np.array([[71, 8, 1, 0, 0], [3, 5, 19, 44, 1]])
    tgt = np.array([[9, 1, 0], [4, 2, 1]])
    dec = np.concatenate([np.zeros((2, 1), np.int64), tgt[:, :-1]], axis=1)
    ours = np.asarray(T5(config).apply({"params": params}, enc, dec, tgt))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    np.testing.assert_allclose(ours[tgt > 0], ref[tgt > 0], atol=1e-4, rtol=1e-4)


def test_model_dir_reads_latest_step(t5x_tiny, tmp_path):
    shutil.copytree(t5x_tiny, tmp_path / "checkpoint_3")
    config, _ = prompt_jax.load_checkpoint(str(tmp_path))
    assert config.d_model == 4


def test_t5x_shape_mismatch_names_parameter(t5x_tiny):
    wrong = prompt_jax.get_config("tiny")
    with pytest.raises(ValueError, match=r"checkpoint_3: parameter decoder/decoder_norm/scale has "
                                         r"shape \(4,\), expected \(64,\)"):
        prompt_jax.load_checkpoint(str(t5x_tiny), config=wrong)


def test_truncated_zarr_chunk_is_reported(t5x_tiny, tmp_path):
    ckpt = tmp_path / "checkpoint_3"
    shutil.copytree(t5x_tiny, ckpt)
    chunk = ckpt / "target.encoder.layers_0.mlp.wo.kernel" / "0.0"
    chunk.chmod(0o644)
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(ValueError, match=r"target.encoder.layers_0.mlp.wo.kernel.*"
                                         r"encoder/layers_0/mlp/wo/kernel"):
        prompt_jax.load_checkpoint(str(ckpt))


def test_vocab_agrees_between_seqio_and_transformers(vocab_path, tmp_path):
    seqio = pytest.importorskip("seqio")
    transformers = pytest.importorskip("transformers")
    shutil.copy(vocab_path, tmp_path / "spiece.model")
    hf = transformers.T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=100)
    ours = seqio.SentencePieceVocabulary(str(vocab_path), extra_ids=100)
    assert ours.vocab_size == len(hf) == 32100
    sentences = [
        "Hello world!",
        "rte sentence1: A man is eating pizza. sentence2: Someone eats.",
        "The <extra_id_0> sat on <extra_id_1> mat.",
        "Ünïcödé — tabs\tand  double  spaces",
        "<extra_id_99> the last sentinel, and numbers 3.14159",
    ]
    for text in sentences:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
    assert ours.encode("<extra_id_0>") == [32099] and ours.encode("<extra_id_99>") == [32000]


def _hf_dir(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                num_heads=2, feed_forward_proj="gated-gelu")
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path)
    return tmp_path


def test_sharded_safetensors_directory(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = _hf_dir(tmp_path / "single")
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(dst / fname))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    _, a = prompt_jax.load_checkpoint(str(src))
    _, b = prompt_jax.load_checkpoint(str(dst))
    for k, v in flatten(a).items():
        np.testing.assert_array_equal(flatten(b)[k], v)


def test_pickled_pytorch_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 8,
                                                      "d_model": 4, "d_kv": 2, "d_ff": 8,
                                                      "num_heads": 2, "num_layers": 1}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*refuses.*save_pretrained"):
        prompt_jax.load_checkpoint(str(tmp_path))


def test_hf_shape_mismatch_names_file_and_parameter(tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _hf_dir(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((8, 15), np.float32)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wo/kernel has shape \(15, 8\), "
                                         r"expected \(16, 8\)"):
        prompt_jax.load_checkpoint(str(d))


def test_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompt_jax.load_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        prompt_jax.load_checkpoint(str(tmp_path))


# ---- t5x checkpoints written by the prompt-tuning reference (prompt variables inside) ----

REFERENCE_PROMPT = "encoder/prompt/prompt/prompt"


def _prompt(shape, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, shape).astype(np.float32)


@pytest.mark.parametrize("zarr", [False, True], ids=["inline", "zarr"])
def test_prompt_tuned_t5x_gives_frozen_tree_and_its_prompt(tmp_path, zarr):
    from prompt_jax.checkpoints.t5x import extract_variable, t5x_prompts
    from prompt_jax.checkpoints.tree import PROMPT_PATH
    from prompt_jax.pytree import unflatten

    prompt = _prompt((5, 4))
    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {REFERENCE_PROMPT: prompt},
                           zarr=(REFERENCE_PROMPT,) if zarr else ())
    config, params = prompt_jax.load_checkpoint(str(ckpt))
    assert set(flatten(params)) == set(expected_shapes(config))  # no prompt in the frozen tree
    found = t5x_prompts(str(ckpt))
    assert list(found) == ["prompt"]
    np.testing.assert_array_equal(found["prompt"], prompt)
    for name in ("target/" + REFERENCE_PROMPT, "/" + REFERENCE_PROMPT, REFERENCE_PROMPT):
        np.testing.assert_array_equal(extract_variable(str(ckpt), name), prompt)
    np.testing.assert_array_equal(extract_variable(str(ckpt / "checkpoint")), prompt)
    np.testing.assert_array_equal(extract_variable(str(tmp_path)), prompt)  # the model dir

    # The frozen tree serves the prompt as prefix embeddings, as a prompt model would.
    enc = jnp.array([[71, 8, 1, 0], [3, 5, 19, 1]])
    served, _ = T5(config).apply({"params": params}, enc, prompt, method=T5.encode)
    own, _ = T5(config, prompt_length=5).apply(
        {"params": unflatten({**flatten(params), PROMPT_PATH: prompt})}, enc, method=T5.encode)
    np.testing.assert_allclose(np.asarray(served), np.asarray(own), rtol=1e-6, atol=1e-6)


def test_t5x_without_prompt_has_no_prompts(t5x_tiny):
    from prompt_jax.checkpoints.t5x import t5x_prompts

    assert t5x_prompts(str(t5x_tiny)) == {}


def test_extract_variable_missing_names_checkpoint_and_close_names(tmp_path):
    from prompt_jax.checkpoints.t5x import extract_variable

    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {REFERENCE_PROMPT: _prompt((5, 4))})
    with pytest.raises(ValueError, match=r"checkpoint_3/checkpoint: no variable "
                                         r"target/encoder/prompt/prompt/promt; closest: "
                                         r"target/encoder/prompt/prompt/prompt"):
        extract_variable(str(ckpt), "target/encoder/prompt/prompt/promt")
    with pytest.raises(ValueError, match=r"checkpoint_3/checkpoint: target/encoder/prompt is a "
                                         r"scope, not a variable; it holds target/encoder/"):
        extract_variable(str(ckpt), "encoder/prompt")
    with pytest.raises(FileNotFoundError, match=r"nope: t5x checkpoint path does not exist"):
        extract_variable(str(tmp_path / "nope"))


def _reference_project(shared, tasks, out):
    """The reference's definition, position by position: task j's affine map of row i."""
    size = shared.shape[1]
    result = np.zeros((len(tasks), len(shared), out), np.float32)
    for i in range(len(shared)):
        for j in range(len(tasks)):
            kernel = tasks[j, : out * size].reshape(out, size)
            result[j, i] = kernel @ shared[i] + tasks[j, out * size:]
    return result


MULTITASK = {  # combine: (shared [P_s, H_s], tasks [N, S], expected [N, P, E]); E = 4
    "add": ((3, 4), (2, 12), lambda s, t: s[None] + t.reshape(2, 3, 4)),
    "concat": ((2, 4), (2, 12), lambda s, t: np.concatenate(
        [np.stack([s, s]), t.reshape(2, 3, 4)], axis=1)),
    "concat_features": ((3, 1), (2, 9), lambda s, t: np.concatenate(
        [np.stack([s, s]), t.reshape(2, 3, 3)], axis=2)),
    "project": ((3, 2), (2, 12), lambda s, t: _reference_project(s, t, 4)),
}


@pytest.mark.parametrize("combine", sorted(MULTITASK))
def test_multitask_prompts_combined_per_task(tmp_path, combine):
    from prompt_jax.checkpoints.t5x import SHARED_PROMPT, TASK_PROMPTS, t5x_prompts

    shared_shape, tasks_shape, expected = MULTITASK[combine]
    shared, tasks = _prompt(shared_shape, 1), _prompt(tasks_shape, 2)
    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {SHARED_PROMPT: shared,
                                                      TASK_PROMPTS: tasks})
    want = expected(shared, tasks)
    found = t5x_prompts(str(ckpt), combine=combine)
    assert sorted(found) == ["task_0", "task_1"]
    for i in range(2):
        np.testing.assert_allclose(found[f"task_{i}"], want[i], rtol=1e-6, atol=1e-6)

    # Without `combine`, the run's config.gin (t5x writes it to the model dir) decides.
    with pytest.raises(ValueError, match=r"checkpoint_3/checkpoint: a multi-task prompt .*"
                                         r"no .*config.gin.*pass combine= one of add, concat"):
        t5x_prompts(str(ckpt))
    name = {"add": "Add", "concat": "Concat", "concat_features": "ConcatFeatures",
            "project": "Project"}[combine]
    (tmp_path / "config.gin").write_text(
        f"train_prompts.MultiTaskPrompt.prompt = @multitask_prompts.{name}MultiTaskPrompt()\n"
        f"multitask_prompts.{name}MultiTaskPrompt.length = {shared_shape[0]}\n")
    np.testing.assert_allclose(t5x_prompts(str(ckpt))["task_1"], want[1], rtol=1e-6, atol=1e-6)


def test_multitask_shapes_that_do_not_combine_are_refused(tmp_path):
    from prompt_jax.checkpoints.t5x import SHARED_PROMPT, TASK_PROMPTS, t5x_prompts

    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", {SHARED_PROMPT: _prompt((3, 4)),
                                                      TASK_PROMPTS: _prompt((2, 10))})
    with pytest.raises(ValueError, match=r"shared_prompt \(3, 4\) and task_prompts \(2, 10\) "
                                         r"do not combine by 'add' into prompts of width 4"):
        t5x_prompts(str(ckpt), combine="add")


@pytest.mark.parametrize("leaves,match", [
    ({"decoder/prompt/prompt/prompt": _prompt((5, 4))},
     r"prompt variables \['target/decoder/prompt/prompt/prompt'\] are not a layout prompt_jax "
     r"reads; supported: one prompt at target/encoder/prompt/prompt/prompt"),
    ({REFERENCE_PROMPT: _prompt((5, 6))},
     r"target/encoder/prompt/prompt/prompt has shape \(5, 6\), expected \[P, 4\]"),
    ({REFERENCE_PROMPT: np.full((5, 4), np.inf, np.float32)},
     r"prompt prompt holds 20 NaN/inf values"),
], ids=["decoder_prompt", "width", "inf"])
def test_unreadable_t5x_prompts_are_refused(tmp_path, leaves, match):
    from prompt_jax.checkpoints.t5x import t5x_prompts

    ckpt = t5x_with_prompt(tmp_path / "checkpoint_3", leaves)
    with pytest.raises(ValueError, match=r"checkpoint_3/checkpoint: " + match):
        t5x_prompts(str(ckpt))
    config, params = prompt_jax.load_checkpoint(str(ckpt))  # the frozen model still loads
    assert set(flatten(params)) == set(expected_shapes(config))
