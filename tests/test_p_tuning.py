"""P-tuning v1: the prompt encoder equals PEFT's, the step trains only the encoder, a run's
saved prompts are the encoder's output and reproduce its logits, and eval/infer run from
the run's MODEL_DIR/config.gin alone."""

from __future__ import annotations

import json
import re

import flax
import jax
import numpy as np
import pytest
from conftest import run, run_job, tiny_config

from prompt_jax import optim, train_step
from prompt_jax.methods import p_tuning
from prompt_jax.model_dir import read_metrics
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import PROMPT_PATH, T5

torch = pytest.importorskip("torch")
peft_p_tuning = pytest.importorskip("peft.tuners.p_tuning.model")

P = 6


def peft_encoder(kind: str, hidden: int, layers: int, width: int, state: dict):
    """PEFT's own PromptEncoder with `state` (our params through `torch_state_dict`)."""
    from peft import PromptEncoderConfig

    config = PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=len(state["embedding.weight"]),
        token_dim=width,
        num_transformer_submodules=1, num_attention_heads=4, num_layers=2,
        encoder_reparameterization_type=kind.upper(), encoder_hidden_size=hidden,
        encoder_num_layers=layers)
    encoder = peft_p_tuning.PromptEncoder(config)
    encoder.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
    return encoder


def peft_output(encoder) -> np.ndarray:
    with torch.no_grad():
        return encoder(torch.arange(encoder.total_virtual_tokens)[None]).numpy()[0]


def init(spec, config, prompt_length=P):
    model = T5(config, prompt_length=prompt_length, prompt_encoder=spec)
    tokens = np.ones((1, 3), np.int32)
    return model, flax.linen.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens)["params"])


@pytest.mark.parametrize("kind,layers", [("lstm", 1), ("lstm", 2), ("mlp", 2)])
def test_encoder_equals_peft_prompt_encoder(kind, layers):
    config = tiny_config()
    spec = p_tuning.PromptEncoderSpec(kind, hidden_size=24, num_layers=layers)
    _, params = init(spec, config)
    flat = flatten(params)
    # Random non-trivial values everywhere (the init's zero biases would hide a bias mix-up).
    rng = np.random.default_rng(0)
    flat = {k: (rng.normal(size=np.shape(v)).astype(np.float32) * 0.3
                if k.startswith(p_tuning.SCOPE) else v) for k, v in flat.items()}
    state = p_tuning.torch_state_dict(flat)
    ref = peft_output(peft_encoder(kind, 24, layers, config.d_model, state))
    ours = p_tuning.prompt_of(flat, spec)
    assert ours.shape == (P, config.d_model)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=1e-5)
    # The control: a reversed LSTM direction (or a shuffled MLP layer) is visibly different.
    key = ("lstm_head.weight_ih_l0_reverse" if kind == "lstm" else "mlp_head.2.weight")
    state[key] = state[key][::-1].copy()
    assert np.abs(peft_output(peft_encoder(kind, 24, layers, config.d_model, state))
                  - ours).max() > 1e-3


def test_spec_is_checked():
    with pytest.raises(ValueError, match=r"PromptEncoderSpec.kind='gru' is not one of none, "
                                         r"lstm, mlp"):
        p_tuning.PromptEncoderSpec("gru")


def _weight_gradient_dots(hlo: str, shape: tuple[int, int]) -> int:
    """Dot instructions whose result has a weight's shape (as test_prompt_tuning counts)."""
    return len(re.findall(rf"= f32\[{shape[0]},{shape[1]}\]\{{[^}}]*\}} dot\(", hlo))


def batch(rng, n=3, length=13):
    enc = rng.integers(20, 128, (n, length)).astype(np.int32)
    tgt = np.tile(np.array([[10, 11, 1]], np.int32), (n, 1))
    dec = np.concatenate([np.zeros((n, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt}


def test_compiled_step_trains_the_encoder_and_computes_no_t5_weight_gradients():
    # d_ff 80 and hidden 24: the T5 MLP kernels [64, 80] / [80, 64] appear in no other shape.
    config = tiny_config(d_model=64, d_kv=16, d_ff=80)
    spec = p_tuning.PromptEncoderSpec("lstm", hidden_size=24, num_layers=2)
    model, params = init(spec, config)
    tx = optim.adafactor()
    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    names = set(flatten(trainable))
    assert names == {k for k in flatten(params) if k.startswith(p_tuning.SCOPE)}
    assert PROMPT_PATH not in names and p_tuning.EMBEDDING in names
    step = jax.jit(train_step.make_train_step(model, tx))
    state = train_step.TrainState.create(trainable, tx)
    data = batch(np.random.default_rng(0))
    hlo = step.lower(state, frozen, data).compile().as_text()
    model_tuning = optim.split_params(params, optim.MODEL_TUNING)
    hlo_all = step.lower(train_step.TrainState.create(model_tuning[0], tx), model_tuning[1],
                         data).compile().as_text()
    for shape in ((config.d_model, config.d_ff), (config.d_ff, config.d_model)):
        assert _weight_gradient_dots(hlo_all, shape) > 0  # the check can see them ...
        assert _weight_gradient_dots(hlo, shape) == 0  # ... and they are absent
    before = jax.tree.map(np.array, state.trainable)
    for _ in range(2):
        state, _ = step(state, frozen, data)
    moved = {k: not np.allclose(v, flatten(before)[k]) for k, v in
             flatten(state.trainable).items()}
    assert moved[p_tuning.EMBEDDING] and moved[p_tuning.SCOPE + "mlp_head/layers_1/kernel"]
    assert moved[p_tuning.SCOPE + "lstm_head/l1_reverse/weight_hh"]


# ---------------------------------------------------- a finished run of methods/p_tuning.gin

FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=4", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_examples=8", "--gin.PromptEncoderSpec.hidden_size=16"]


@pytest.fixture(scope="module")
def p_tuning_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("p_tuning") / "run"
    run_job("train", "--gin_file=demo.gin", "--gin_file=methods/p_tuning.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=2",
            "--gin.train.log_period=1", *FAST)
    return model_dir


def checkpoint_params(model_dir, step: int) -> dict:
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(str(model_dir / "checkpoints" / str(step)
                                                  / "default"))
    return {k: np.asarray(v) for k, v in flatten(tree["trainable"]).items()}


def test_saved_prompts_are_the_encoders_output_at_their_step(p_tuning_run):
    hidden = 16
    for step in (2, 4):
        trained = checkpoint_params(p_tuning_run, step)
        assert PROMPT_PATH not in trained and p_tuning.EMBEDDING in trained
        width = trained[p_tuning.EMBEDDING].shape[1]
        ref = peft_output(peft_encoder("lstm", hidden, 2, width,
                                       p_tuning.torch_state_dict(trained)))
        saved = np.load(p_tuning_run / "prompts" / f"{step}.npy")
        np.testing.assert_allclose(saved, ref, atol=2e-6, rtol=1e-5)
    assert not np.allclose(np.load(p_tuning_run / "prompts" / "2.npy"),
                           np.load(p_tuning_run / "prompts" / "4.npy"))
    best = json.loads((p_tuning_run / "best.json").read_text())
    np.testing.assert_array_equal(np.load(p_tuning_run / "best_prompt.npy"),
                                  np.load(p_tuning_run / "prompts" / f"{best['step']}.npy"))


def test_saved_prompt_reproduces_the_runs_logits(p_tuning_run):
    """The frozen model + the encoder's params (the run's state) and the frozen model + the
    saved `[P, E]` prompt give the same logits: serving needs no encoder."""
    from prompt_jax import build

    config, frozen = build.load_frozen(build.ModelSpec(size="tiny", dropout_rate=0.0), None,
                                       str(p_tuning_run), 0)
    trained = checkpoint_params(p_tuning_run, 4)
    spec = p_tuning.PromptEncoderSpec("lstm", hidden_size=16, num_layers=2)
    with_encoder = T5(config, prompt_length=4, prompt_encoder=spec)
    plain = T5(config, prompt_length=4)
    data = batch(np.random.default_rng(3), n=2, length=9)
    data["encoder_input_tokens"] = data["encoder_input_tokens"] + 100  # real-vocabulary ids
    args = (data["encoder_input_tokens"], data["decoder_input_tokens"],
            data["decoder_target_tokens"])
    run_logits = jax.jit(with_encoder.apply)({"params": unflatten(
        {**flatten(frozen), **trained})}, *args)
    prompt = np.load(p_tuning_run / "prompts" / "4.npy")
    served_logits = jax.jit(plain.apply)({"params": unflatten(
        {**flatten(frozen), PROMPT_PATH: prompt})}, *args)
    np.testing.assert_allclose(np.asarray(served_logits), np.asarray(run_logits),
                               atol=1e-5, rtol=1e-5)
    other = jax.jit(plain.apply)({"params": unflatten(
        {**flatten(frozen), PROMPT_PATH: np.load(p_tuning_run / "prompts" / "2.npy")})}, *args)
    assert np.abs(np.asarray(other) - np.asarray(run_logits)).max() > 1e-4  # the control


def test_eval_and_infer_read_the_runs_config(p_tuning_run, capsys):
    """`prompt-jax eval|infer --gin.MODEL_DIR=X`, no gin files: the run's own config.gin
    (random tiny T5 in X/base_model, its lengths and task) gives the run's last eval."""
    last = [r for r in read_metrics(str(p_tuning_run)) if r.get("split")][-1]
    rc, out, err = run(capsys, "eval", f"--gin.MODEL_DIR='{p_tuning_run}'",
                       "--gin.evaluate.eval_examples=8",
                       f"--gin.PROMPT_FILE='{p_tuning_run / 'prompts' / '4.npy'}'")
    assert rc == 0, err
    assert "rank_accuracy=" in out
    metrics = json.loads((p_tuning_run / "eval_validation.json").read_text())["metrics"]
    np.testing.assert_allclose(metrics["loss"], last["loss"], rtol=1e-5)
    assert metrics["rank_accuracy"] == last["rank_accuracy"]
    rc, _, err = run(capsys, "infer", f"--gin.MODEL_DIR='{p_tuning_run}'",
                     "--gin.infer.max_examples=4")
    assert rc == 0, err
    lines = (p_tuning_run / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all("prediction" in json.loads(line) for line in lines)
