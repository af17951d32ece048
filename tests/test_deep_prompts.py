"""Deep prompts: prefix tuning equals PEFT's PREFIX_TUNING on the same HF T5 (logits, greedy
outputs, adapter files both ways); P-tuning v2 trains only its prefixes and its saved
matrix reproduces the run's logits; the attention with a prefix equals a hand-computed one.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import build_hf_model, padded_batch, shift_right, tiny_config

import prompt_jax
from prompt_jax import decoding, optim
from prompt_jax.checkpoints import peft as peft_files
from prompt_jax.methods import deep_prompts
from prompt_jax.methods.deep_prompts import DeepPromptSpec
from prompt_jax.t5.layers import MultiHeadAttention, RelativePositionBiases
from prompt_jax.t5.model import T5

N = 3  # virtual tokens


# ------------------------------------------------------------------ the attention itself


def test_attention_prefix_equals_hand_computed():
    """Keys/values [prefix; tokens], the prefix seen by every query, masks kept for the rest."""
    rng = np.random.default_rng(0)
    b, q, h, d, e = 2, 4, 2, 3, 6
    x = jnp.asarray(rng.normal(size=(b, q, e)), jnp.float32)
    pk, pv = (jnp.asarray(rng.normal(size=(N, h, d)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rng.random((b, 1, q, q)) > 0.3)
    bias = jnp.asarray(rng.normal(size=(1, h, q, N + q)), jnp.float32)
    att = MultiHeadAttention(h, d, e)
    params = nn.unbox(att.init(jax.random.PRNGKey(0), x, x, mask))
    out = att.apply(params, x, x, mask, bias, kv_prefix=(pk, pv))

    p = jax.tree.map(np.asarray, params["params"])
    proj = lambda name: (np.asarray(x) @ p[name]["kernel"]).reshape(b, q, h, d)
    query = proj("query")
    key = np.concatenate([np.broadcast_to(pk, (b, N, h, d)), proj("key")], 1)
    value = np.concatenate([np.broadcast_to(pv, (b, N, h, d)), proj("value")], 1)
    logits = np.einsum("bqhd,bkhd->bhqk", query, key) + np.asarray(bias)
    full_mask = np.concatenate([np.ones((b, 1, q, N), bool), np.asarray(mask)], -1)
    logits = np.where(full_mask, logits, -1e10)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", weights, value).reshape(b, q, h * d) @ p["out"]["kernel"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    # Control: the prefix changes the output.
    assert np.abs(np.asarray(att.apply(params, x, x, mask, bias[..., N:])) - ref).max() > 1e-3


def _hf_bias_module(seed: int, is_decoder: bool):
    """(HF T5Attention with a relative-bias table [2 heads, 8 buckets], max distance 12;
    that table as numpy [H, buckets])."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(num_heads=2, relative_attention_num_buckets=8,
                                relative_attention_max_distance=12, is_decoder=is_decoder)
    hf = transformers.models.t5.modeling_t5.T5Attention(cfg, has_relative_attention_bias=True)
    table = np.random.default_rng(seed).normal(size=(2, 8)).astype(np.float32)
    with torch.no_grad():
        hf.relative_attention_bias.weight.copy_(torch.tensor(table.T))
    return hf, table


def test_prefix_bias_is_hf_bias_with_n_positions_cached():
    """Queries at N.., prefix keys at 0..N-1 (HF's compute_bias(past_seen_tokens=N))."""
    hf, table = _hf_bias_module(0, is_decoder=True)
    for bidirectional in (False, True):
        hf.is_decoder = not bidirectional
        ref = hf.compute_bias(5, N + 5, past_seen_tokens=N).detach().numpy()
        rel = RelativePositionBiases(8, 12, 2)
        ours = rel.apply({"params": {"rel_embedding": table}}, 5, 5, bidirectional,
                         key_prefix=N)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-6)
        for step in range(5):  # one decoding step at position `step`
            one = rel.apply({"params": {"rel_embedding": table}}, 1, 5, bidirectional,
                            query_offset=jnp.int32(step), key_prefix=N)
            np.testing.assert_allclose(np.asarray(one)[0, :, 0], ref[0, :, step], atol=1e-6)


def test_prefix_bias_per_row_shift_is_the_unpadded_rows_bias():
    """With `query_shift` s_b, row b's queries at s_b.. see the prefix keys as an unpadded
    row's queries at 0.. do (HF's compute_bias(past_seen_tokens=N) on the shorter row)."""
    hf, table = _hf_bias_module(1, is_decoder=False)
    rel = RelativePositionBiases(8, 12, 2)
    length, shifts = 9, [0, 3, 5]
    ours = np.asarray(rel.apply({"params": {"rel_embedding": table}}, length, length, True,
                                key_prefix=N, query_shift=jnp.asarray(shifts)))
    assert ours.shape == (3, 2, length, N + length)
    for b, s in enumerate(shifts):
        ref = hf.compute_bias(length - s, N + length - s, past_seen_tokens=N).detach().numpy()
        np.testing.assert_allclose(ours[b, :, s:, :N], ref[0, :, :, :N], atol=1e-6)
        np.testing.assert_allclose(ours[b, :, s:, N + s:], ref[0, :, :, N:], atol=1e-6)
    assert np.abs(ours[1, :, 3:, :N] - ours[0, :, 3:, :N]).max() > 1e-3  # the shift matters


def test_p_tuning_v2_rows_with_left_padded_prompts_equal_each_alone():
    """A batch of rows whose prompts (lengths 2 and 5) are left-padded to one width gives
    each row the logits it has alone, unpadded, under a P-tuning v2 deep prompt."""
    spec = DeepPromptSpec("p_tuning_v2", 3)
    model, params = _v2_model(spec)
    rng = np.random.default_rng(4)
    b = _v2_batch(rng, n=2)
    prompts = [rng.normal(size=(n, V2_CONFIG.d_model)).astype(np.float32) for n in (2, 5)]
    width = 5
    prefix = np.zeros((2, width, V2_CONFIG.d_model), np.float32)
    mask = np.zeros((2, width), bool)
    for i, p in enumerate(prompts):
        prefix[i, width - len(p):], mask[i, width - len(p):] = p, True
    apply = jax.jit(model.apply)  # one compile per shape, not one dispatch per op
    batched = apply({"params": params}, b["encoder_input_tokens"],
                    b["decoder_input_tokens"], prefix_embeddings=jnp.asarray(prefix),
                    prefix_mask=jnp.asarray(mask))
    for i, p in enumerate(prompts):
        alone = apply({"params": params}, b["encoder_input_tokens"][i:i + 1],
                      b["decoder_input_tokens"][i:i + 1], prefix_embeddings=jnp.asarray(p))
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(alone[0]), atol=1e-5)


# ------------------------------------------------------------------ prefix tuning vs PEFT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# Symmetric stacks (layers j and j+S/2 share a prefix in PEFT's layout) and an encoder
# deeper than the decoder, with logarithmic buckets.
MODELS = ("t5_1_1_untied_gated_gelu", "deep_padded_log_buckets")


@pytest.fixture(scope="module", params=MODELS)
def hf_t5(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, path)
    config, params = prompt_jax.load_checkpoint(str(path))
    return path, config, params


def _hf(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32).eval()


def _batch():
    rng = np.random.default_rng(1)
    enc = padded_batch(rng, [11, 6, 3], 11)
    tgt = padded_batch(rng, [5, 3, 5], 5)
    return enc, shift_right(tgt), tgt


def _peft_logits(model):
    enc, dec, _ = _batch()
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def _prefix_model(config, params, matrix):
    spec = DeepPromptSpec("prefix_tuning", matrix.shape[0])
    return T5(config, deep_prompt_spec=spec), {
        **params, deep_prompts.DEEP_PROMPT_PATH: deep_prompts.params_for(matrix)}


def _ours(config, params, matrix=None):
    enc, dec, tgt = _batch()
    if matrix is None:
        return np.asarray(T5(config).apply({"params": params}, enc, dec, tgt))
    model, full = _prefix_model(config, params, matrix)
    return np.asarray(model.apply({"params": full}, enc, dec, tgt))


def _assert_close(ours, ref, atol=1e-4):
    valid = _batch()[2] > 0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=atol, rtol=1e-4)


def _peft_prefix_model(path, **options):
    torch.manual_seed(0)
    model = peft.get_peft_model(_hf(path), peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N, **options)).eval()
    return model


def _greedy(peft_model, config, params, matrix, steps=6):
    enc = _batch()[0]
    model, full = _prefix_model(config, params, matrix)
    ours, _ = decoding.greedy_decode(model, full, jnp.asarray(enc), steps)
    with torch.no_grad():
        ref = peft_model.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                                  attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                                  do_sample=False, num_beams=1, max_new_tokens=steps,
                                  min_new_tokens=0, eos_token_id=1, pad_token_id=0,
                                  decoder_start_token_id=0).numpy()[:, 1:]
    return np.asarray(ours), np.pad(ref, ((0, 0), (0, steps - ref.shape[1])))


def test_prefix_tuning_equals_peft(hf_t5, tmp_path):
    path, config, params = hf_t5
    made = _peft_prefix_model(path)
    matrix = made.prompt_encoder["default"].embedding.weight.detach().numpy().copy()
    assert matrix.shape == (N, DeepPromptSpec("prefix_tuning", N).width(config))
    ref = _peft_logits(made)
    ours = _ours(config, params, matrix)
    _assert_close(ours, ref)
    assert np.abs(ours - _ours(config, params))[_batch()[2] > 0].max() > 1e-2  # control

    tokens, ref_tokens = _greedy(made, config, params, matrix)
    np.testing.assert_array_equal(tokens, ref_tokens)
    plain, _ = decoding.greedy_decode(T5(config), params, jnp.asarray(_batch()[0]), 6)
    assert (np.asarray(plain) != ref_tokens).any()  # control: the prefix changes the outputs

    # PEFT's own adapter loads here; ours loads in PEFT; both give the same logits.
    made.save_pretrained(str(tmp_path / "theirs"))
    loaded = peft_files.load_peft_prefix(str(tmp_path / "theirs"), config)
    np.testing.assert_array_equal(loaded, matrix)
    peft_files.save_peft_prefix(matrix, str(tmp_path / "ours"), str(path), config=config)
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written == {**{k: v for k, v in theirs.items() if k != "peft_version"},
                       "base_model_name_or_path": str(path)}
    served = peft.PeftModel.from_pretrained(_hf(path), str(tmp_path / "ours")).eval()
    _assert_close(ours, _peft_logits(served))


def test_prefix_projection_equals_peft(hf_t5, tmp_path):
    """PEFT's prefix_projection (Embedding + MLP) with the same weights in ours; the saved
    matrix is its output, which PEFT saves too."""
    path, config, params = hf_t5
    made = _peft_prefix_model(path, prefix_projection=True, encoder_hidden_size=16)
    enc_ = made.prompt_encoder["default"]
    t = lambda x: x.detach().numpy().copy()
    deep = {"embedding": t(enc_.embedding.weight),
            "transform_0_kernel": t(enc_.transform[0].weight).T,
            "transform_0_bias": t(enc_.transform[0].bias),
            "transform_1_kernel": t(enc_.transform[2].weight).T,
            "transform_1_bias": t(enc_.transform[2].bias)}
    spec = DeepPromptSpec("prefix_tuning", N, projection_hidden=16)
    assert {k: v.shape for k, v in deep.items()} == {
        k: v.shape for k, v in deep_prompts.init_params(spec, config, jax.random.PRNGKey(0)
                                                        ).items()}
    enc, dec, tgt = _batch()
    ours = np.asarray(T5(config, deep_prompt_spec=spec).apply(
        {"params": {**params, "deep_prompt": deep}}, enc, dec, tgt))
    # The projection's MLP output feeds every layer: on a loaded 2-core machine a few of
    # 1,560 logits differed from PEFT's by up to 1.7e-4 (within 1e-4 alone); a layout error
    # is O(1).
    _assert_close(ours, _peft_logits(made), atol=5e-4)
    made.save_pretrained(str(tmp_path / "projected"))
    saved = peft_files.load_peft_prefix(str(tmp_path / "projected"), config)
    np.testing.assert_allclose(deep_prompts.deep_prompt_matrix(spec, config, deep), saved,
                               atol=1e-5)
    _assert_close(_ours(config, params, saved), ours)


def _edit(directory, **fields):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


PREFIX_REFUSALS = {
    "num_layers": (lambda d: _edit(d, num_layers=7),
                   r"adapter_config.json: num_layers is 7, expected 2 \(the frozen model's"),
    "heads": (lambda d: _edit(d, num_attention_heads=2),
              r"adapter_config.json: num_attention_heads is 2, expected 4"),
    "causal": (lambda d: _edit(d, task_type="CAUSAL_LM"),
               r"adapter_config.json: task_type is 'CAUSAL_LM', expected 'SEQ_2_SEQ_LM'"),
    "prompt_tuning": (lambda d: _edit(d, peft_type="PROMPT_TUNING"),
                      r"adapter_config.json: peft_type is 'PROMPT_TUNING', expected "
                      r"'PREFIX_TUNING'"),
    "shape": (lambda d: _edit(d, num_virtual_tokens=N + 1),
              r"adapter_model.safetensors: prompt_embeddings has shape \(3, 128\), expected "
              r"\(4, 128\)"),
}


@pytest.mark.parametrize("case", sorted(PREFIX_REFUSALS))
def test_prefix_adapter_refusals_name_file_and_field(tmp_path, case):
    config = tiny_config()
    matrix = np.zeros((N, config.num_encoder_layers * 2 * config.joined_kv), np.float32)
    peft_files.save_peft_prefix(matrix, str(tmp_path / "a"), config=config)
    spoil, match = PREFIX_REFUSALS[case]
    spoil(tmp_path / "a")
    with pytest.raises(ValueError, match=match) as caught:
        peft_files.load_peft_prefix(str(tmp_path / "a"), config)
    assert str(tmp_path / "a") in str(caught.value) and "\n" not in str(caught.value)


# ------------------------------------------------------------------ P-tuning v2


def test_p_tuning_v2_placement_and_bad_specs():
    config = tiny_config(num_encoder_layers=4)
    spec = DeepPromptSpec("p_tuning_v2", N, layers=(2, 3))
    assert spec.placement(config) == {"encoder": {2: (0, 1), 3: (2, 3)}, "decoder": {}}
    assert DeepPromptSpec("prefix_tuning", N).placement(config)["decoder"] == {
        0: (0, 1), 1: (4, 5)}
    with pytest.raises(ValueError, match=re.escape("layers=[2, 5]: the encoder has layers 0..3")):
        DeepPromptSpec("p_tuning_v2", N, layers=(2, 5)).placement(config)
    with pytest.raises(ValueError, match="distinct layer indices in increasing order"):
        DeepPromptSpec("p_tuning_v2", N, layers=(3, 2))
    with pytest.raises(ValueError, match="method='p_tuning_v3' is not one of"):
        DeepPromptSpec("p_tuning_v3", N)


# P-tuning v2 on a model whose weight shapes are recognisable in HLO (d_ff 80).
V2_CONFIG = tiny_config(d_model=64, d_kv=16, num_heads=4, d_ff=80, vocab_size=128)


def _v2_batch(rng, n=4, length=12):
    enc = rng.integers(20, 128, (n, length)).astype(np.int32)
    enc[:, -1] = 1
    enc[1, 6:] = 0  # a padded row
    tgt = np.tile(np.array([[10, 11, 1]], np.int32), (n, 1))
    return {"encoder_input_tokens": enc, "decoder_input_tokens": shift_right(tgt),
            "decoder_target_tokens": tgt}


def _v2_model(spec):
    from prompt_jax.methods import deep_prompts as dp

    model = T5(V2_CONFIG, deep_prompt_spec=spec)
    b = _v2_batch(np.random.default_rng(0))
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), b["encoder_input_tokens"],
                                          b["decoder_input_tokens"])["params"])
    assert set(params[dp.DEEP_PROMPT_PATH]) == set(dp.init_params(spec, V2_CONFIG,
                                                                  jax.random.PRNGKey(1)))
    return model, params


@pytest.mark.parametrize("projection_hidden", [0, 24])
def test_p_tuning_v2_trains_only_its_prefixes_and_reloads_exactly(projection_hidden, tmp_path):
    from prompt_jax import train_step

    spec = DeepPromptSpec("p_tuning_v2", N, layers=(1,), projection_hidden=projection_hidden)
    model, params = _v2_model(spec)
    trainable, frozen = optim.split_params(params, optim.DEFAULT_TRAINABLE)
    assert set(optim.flatten(trainable)) == {
        f"deep_prompt/{k}" for k in params["deep_prompt"]}
    tx = optim.adafactor(multiply_by_parameter_scale=True)
    state = train_step.TrainState.create(trainable, tx)
    step = jax.jit(train_step.make_train_step(model, tx))
    before = jax.tree.map(np.array, (trainable, frozen))
    rng = np.random.default_rng(1)
    for _ in range(3):
        state, metrics = step(state, frozen, _v2_batch(rng))
    for path, value in optim.flatten(frozen).items():
        np.testing.assert_array_equal(np.asarray(value), optim.flatten(before[1])[path])
    for path, value in optim.flatten(state.trainable).items():
        assert not np.allclose(np.asarray(value), optim.flatten(before[0])[path]), path

    # The compiled step computes no weight gradient (the MLP kernels' [64, 80] / [80, 64]
    # dots appear when every weight trains, and are absent here).
    batch = _v2_batch(np.random.default_rng(2))
    hlo = {}
    for name, regexes in (("deep", optim.DEFAULT_TRAINABLE), ("model", optim.MODEL_TUNING)):
        tr, fr = optim.split_params(params, regexes)
        compiled = jax.jit(train_step.make_train_step(model, tx)).lower(
            train_step.TrainState.create(tr, tx), fr, batch).compile()
        hlo[name] = compiled.as_text()
    for shape in ((64, 80), (80, 64)):
        pattern = re.compile(rf"= f32\[{shape[0]},{shape[1]}\]\{{[^}}]*\}} dot\(")
        assert pattern.findall(hlo["model"]) and not pattern.findall(hlo["deep"]), shape

    # The saved matrix (the projection's output) alone reproduces the trained model's logits.
    full = optim.merge_params(state.trainable, frozen)
    matrix = deep_prompts.deep_prompt_matrix(spec, V2_CONFIG, full["deep_prompt"])
    deep_prompts.save_deep_prompt(str(tmp_path / "d.npz"), spec, V2_CONFIG, matrix)
    loaded_spec, loaded, head = deep_prompts.load_deep_prompt(str(tmp_path / "d.npz"),
                                                               V2_CONFIG)
    assert head is None
    assert loaded_spec == spec.for_inference()
    served = {**{k: v for k, v in full.items() if k != "deep_prompt"},
              "deep_prompt": deep_prompts.params_for(loaded)}
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"])
    ref = np.asarray(model.apply({"params": full}, *args))
    ours = np.asarray(T5(V2_CONFIG, deep_prompt_spec=loaded_spec).apply({"params": served},
                                                                        *args))
    np.testing.assert_array_equal(ours, ref)
    plain = np.asarray(T5(V2_CONFIG).apply({"params": frozen}, *args))
    assert np.abs(plain - ref).max() > 1e-3  # control: the prefixes matter


def test_p_tuning_v2_prefix_reaches_only_its_layers():
    """A prefix in encoder layer 1 leaves layer 0's output as without prefixes."""
    spec = DeepPromptSpec("p_tuning_v2", N, layers=(1,))
    model, params = _v2_model(spec)
    enc = _v2_batch(np.random.default_rng(0))["encoder_input_tokens"]
    plain = {k: v for k, v in params.items() if k != "deep_prompt"}
    capture = lambda m, p: m.apply({"params": p}, enc, method=T5.encode, capture_intermediates=(
        lambda mdl, name: name == "__call__" and mdl.name in ("layers_0", "layers_1")),
        mutable=["intermediates"])[1]["intermediates"]["encoder"]
    with_prefix, without = capture(model, params), capture(T5(V2_CONFIG), plain)
    np.testing.assert_array_equal(np.asarray(with_prefix["layers_0"]["__call__"][0]),
                                  np.asarray(without["layers_0"]["__call__"][0]))
    assert np.abs(np.asarray(with_prefix["layers_1"]["__call__"][0])
                  - np.asarray(without["layers_1"]["__call__"][0])).max() > 1e-3


DEEP_FILE_REFUSALS = {
    "heads": (dict(num_heads=np.array(2)), r"d.npz: num_heads is 2, expected 4"),
    "shape": (dict(embedding=np.zeros((N, 7), np.float32)),
              r"d.npz: embedding has shape \(3, 7\), expected \(3, 128\)"),
    "method": (dict(method=np.array("lora")), r"d.npz: method is 'lora', expected one of"),
    "layers": (dict(layers=np.array([5])), r"d.npz: DeepPromptSpec.layers=\[5\]: the encoder"),
    "nan": (dict(embedding=np.full((N, 128), np.nan, np.float32)),
            r"d.npz: embedding holds 384 NaN/inf values"),
}


@pytest.mark.parametrize("case", sorted(DEEP_FILE_REFUSALS))
def test_deep_prompt_file_refusals(tmp_path, case):
    spec = DeepPromptSpec("p_tuning_v2", N, layers=(1,))
    path = tmp_path / "d.npz"
    deep_prompts.save_deep_prompt(str(path), spec, V2_CONFIG, np.zeros((N, 128), np.float32))
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    change, match = DEEP_FILE_REFUSALS[case]
    np.savez(path, **{**arrays, **change})
    with pytest.raises(ValueError, match=match) as caught:
        deep_prompts.load_deep_prompt(str(path), V2_CONFIG)
    assert "\n" not in str(caught.value)


# ------------------------------------------------------------------ the jobs, as a user runs them


def test_prefix_tuning_demo_run_eval_export_and_peft_prompt_file(tmp_path, capsys):
    """`prompt-jax train` with methods/prefix_tuning.gin on the demo; `prompt-jax eval` of the
    run reproduces the train job's best eval loss from best_deep_prompt.npz alone;
    `prompt-jax export-peft` writes it as a PEFT adapter that PROMPT_FILE reads back and PEFT
    serves with our logits. (The commands run in process: `cli.main`, as the console script
    calls it; the jobs' own process behaviour is tested in test_train_job / test_bad_inputs.)"""
    from conftest import DEMO, run, train_args

    run_dir = tmp_path / "run"
    command, *args = train_args(run_dir, 2, 2, [*DEMO, "--gin.DeepPromptSpec.length=4"])
    rc, _, err = run(capsys, command, "--gin_file=demo.gin",
                     "--gin_file=methods/prefix_tuning.gin", *args)
    assert rc == 0, err
    assert (run_dir / "deep_prompts" / "2.npz").is_file()
    assert not (run_dir / "best_prompt.npy").exists()
    best = json.loads((run_dir / "best.json").read_text())["metrics"]["loss"]
    config, params = prompt_jax.load_checkpoint(_demo_t5())
    spec, matrix, _ = deep_prompts.load_deep_prompt(str(run_dir / "best_deep_prompt.npz"),
                                                    config)
    assert spec.method == "prefix_tuning" and matrix.shape[0] == 4

    rc, _, err = run(capsys, "eval", "--gin_file=demo_eval.gin", f"--gin.MODEL_DIR='{run_dir}'",
                     "--gin.evaluate.eval_examples=24")
    assert rc == 0, err
    result = json.loads((run_dir / "eval_validation.json").read_text())
    assert result["prompt_file"] == str(run_dir / "best_deep_prompt.npz")
    assert result["metrics"]["loss"] == pytest.approx(best, rel=1e-6)

    adapter = tmp_path / "adapter"
    rc, _, err = run(capsys, "export-peft", str(run_dir / "best_deep_prompt.npz"), str(adapter),
                     "--base_model", _demo_t5())
    assert rc == 0, err
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == \
        "PREFIX_TUNING"
    from prompt_jax import build

    served_by_file = build.load_served(build.ModelSpec(), _demo_t5(), None, [str(adapter)])
    assert served_by_file.prompts == {} and served_by_file.deep_prompt[0] == spec
    np.testing.assert_array_equal(served_by_file.deep_prompt[1], matrix)
    served = peft.PeftModel.from_pretrained(_hf(_demo_t5()), str(adapter)).eval()
    _assert_close(_ours(config, params, matrix), _peft_logits(served))


def _demo_t5() -> str:
    from prompt_jax import build

    return build.demo_path("inhouse_tiny_t5")
