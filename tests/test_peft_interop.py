"""PEFT prompt adapters: our prompts served by PEFT, PEFT's (prompt tuning, P-tuning) by us.

One random tiny T5 1.1 is written with `save_pretrained` and read by `load_checkpoint`;
PEFT wraps the same HF model. Logits must agree within 1e-4, greedy outputs exactly,
and each refusal names the file and the field.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import prompt_jax  # noqa: E402
from prompt_jax import decoding, prompts  # noqa: E402
from prompt_jax.checkpoints.peft import is_peft_adapter, load_peft  # noqa: E402

VOCAB, D_MODEL, P = 120, 32, 5
HF_CONFIG = dict(vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=48, num_layers=2,
                 num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False, dropout_rate=0.0)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """(HF directory, prompt_jax config, params) of one random T5 1.1 (untied, gated-GELU)."""
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**HF_CONFIG))
    # transformers >= 5 ties lm_head to the embedding on construction; T5 1.1 does not.
    hf.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, D_MODEL))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct random values everywhere, norm scales around 1
        for name, p in hf.named_parameters():
            norm = "layer_norm" in name
            p.copy_(float(norm) + (0.5 if norm else 0.2) * torch.randn(p.shape, generator=gen))
    hf.save_pretrained(path)
    config, params = prompt_jax.load_checkpoint(str(path))
    return path, config, params


def _hf(path):
    return transformers.T5ForConditionalGeneration.from_pretrained(str(path)).eval()


def _batch():
    """Padded encoder inputs [3, 12] ending in EOS, targets [3, 5] and decoder inputs."""
    rng = np.random.default_rng(1)
    enc = np.zeros((3, 12), np.int32)
    for row, n in enumerate([12, 7, 3]):
        enc[row, : n - 1] = rng.integers(2, VOCAB, n - 1)
        enc[row, n - 1] = 1
    tgt = rng.integers(2, VOCAB, (3, 5)).astype(np.int32)
    tgt[1, 3:] = [1, 0]
    dec = np.concatenate([np.zeros((3, 1), np.int32), tgt[:, :-1]], axis=1)
    return enc, dec, tgt


def _ours(t5, prompt):
    _, config, params = t5
    enc, dec, tgt = _batch()
    prefix = None if prompt is None else jnp.asarray(prompt)
    return np.asarray(prompt_jax.T5(config).apply({"params": params}, enc, dec, tgt,
                                                  prefix_embeddings=prefix))


def _peft_logits(model):
    enc, dec, _ = _batch()
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def _assert_close(ours, ref):
    valid = _batch()[2] > 0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_our_prompt_served_by_peft(t5, tmp_path):
    hf_dir, config, params = t5
    prompt = np.random.default_rng(0).uniform(-0.5, 0.5, (P, D_MODEL)).astype(np.float32)
    prompts.save_peft(prompt, str(tmp_path / "adapter"), str(hf_dir))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: written[k] for k in ("peft_type", "task_type", "num_transformer_submodules",
                                    "num_virtual_tokens", "token_dim", "num_attention_heads",
                                    "num_layers", "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM",
        "num_transformer_submodules": 1, "num_virtual_tokens": P, "token_dim": D_MODEL,
        "num_attention_heads": 4, "num_layers": 2, "prompt_tuning_init": "RANDOM"}
    prompts.save_peft(prompt, str(tmp_path / "from_config"), config=config)
    assert json.loads((tmp_path / "from_config" / "adapter_config.json").read_text()) == {
        **written, "base_model_name_or_path": None}
    assert is_peft_adapter(str(tmp_path / "adapter")) and not is_peft_adapter(str(hf_dir))
    np.testing.assert_array_equal(prompts.load_peft(str(tmp_path / "adapter")), prompt)

    served = peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path / "adapter")).eval()
    ours = _ours(t5, prompt)
    _assert_close(ours, _peft_logits(served))
    assert np.abs(ours - _ours(t5, None)).max() > 1e-2  # control: the prompt matters

    enc = _batch()[0]
    steps = 8
    tokens, _ = decoding.greedy_decode(prompt_jax.T5(config), params, jnp.asarray(enc), steps,
                                       jnp.asarray(prompt))
    with torch.no_grad():
        ref = served.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                              attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                              do_sample=False, num_beams=1, max_new_tokens=steps,
                              min_new_tokens=0, eos_token_id=1, pad_token_id=0,
                              decoder_start_token_id=0).numpy()[:, 1:]
    ref = np.pad(ref, ((0, 0), (0, steps - ref.shape[1])))
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    plain, _ = decoding.greedy_decode(prompt_jax.T5(config), params, jnp.asarray(enc), steps)
    assert (np.asarray(plain) != ref).any()  # control: unprompted decoding differs


def test_peft_prompt_tuning_adapter_gives_peft_logits(t5, tmp_path):
    hf_dir = t5[0]
    # PEFT's seq2seq default, num_transformer_submodules=2: 2P rows saved, the first P used.
    made = peft.get_peft_model(_hf(hf_dir), peft.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)).eval()
    weight = made.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(torch.empty_like(weight).uniform_(-0.5, 0.5))
    made.save_pretrained(str(tmp_path / "pt"))

    prompt = load_peft(str(tmp_path / "pt"), d_model=D_MODEL)
    assert prompt.shape == (P, D_MODEL) and prompt.dtype == np.float32
    ref = _peft_logits(made)
    _assert_close(_ours(t5, prompt), ref)
    reloaded = peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path / "pt")).eval()
    _assert_close(_ours(t5, prompt), _peft_logits(reloaded))
    # Control: the decoder-side block PEFT also saves is not what its encoder sees.
    unused = weight.detach().numpy()[P:]
    assert np.abs(_ours(t5, unused) - ref)[_batch()[2] > 0].max() > 1e-2


@pytest.mark.parametrize("reparameterization", ["MLP", "LSTM"])
def test_peft_p_tuning_adapter_gives_peft_logits(t5, tmp_path, reparameterization):
    hf_dir = t5[0]
    torch.manual_seed(1)
    made = peft.get_peft_model(_hf(hf_dir), peft.PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4, encoder_hidden_size=16,
        encoder_reparameterization_type=reparameterization)).eval()
    made.save_pretrained(str(tmp_path / "ptuning"))

    prompt = load_peft(str(tmp_path / "ptuning"), d_model=D_MODEL)
    assert prompt.shape == (4, D_MODEL)
    # The saved rows are the prompt encoder's output, not its input embedding.
    raw = made.prompt_encoder["default"].embedding.weight.detach().numpy()[:4]
    assert np.abs(prompt - raw).max() > 1e-2
    _assert_close(_ours(t5, prompt), _peft_logits(made))  # PEFT runs its encoder here
    reloaded = peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path / "ptuning")).eval()
    _assert_close(_ours(t5, prompt), _peft_logits(reloaded))  # ... and its saved rows here


def test_bfloat16_adapter_loads_as_float32(t5, tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "bf16"
    prompts.save_peft(np.zeros((P, D_MODEL), np.float32), str(directory))
    values = torch.linspace(-1, 1, P * D_MODEL).reshape(P, D_MODEL).to(torch.bfloat16)
    save_file({"prompt_embeddings": values}, str(directory / "adapter_model.safetensors"))
    np.testing.assert_array_equal(load_peft(str(directory)), values.float().numpy())


def _peft_made(t5, directory, config):
    peft.get_peft_model(_hf(t5[0]), config).save_pretrained(str(directory))


def _edit_config(directory, **fields):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _write_tensors(directory, tensors):
    from safetensors.numpy import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"))


REFUSALS = {
    "lora": (lambda t5, d: _peft_made(t5, d, peft.LoraConfig(
        task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"])),
        ValueError, r"adapter_config.json: peft_type is 'LORA', expected PROMPT_TUNING or "
                    r"P_TUNING"),
    "prefix_tuning": (lambda t5, d: _peft_made(t5, d, peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)),
        ValueError, r"adapter_config.json: peft_type is 'PREFIX_TUNING', expected .*load as "
                    r"a deep prompt \(load_peft_prefix\)"),
    "causal_lm": (lambda t5, d: _edit_config(d, task_type="CAUSAL_LM"),
                  ValueError, r"adapter_config.json: task_type is 'CAUSAL_LM', expected "
                              r"'SEQ_2_SEQ_LM'"),
    "token_dim": (lambda t5, d: _edit_config(d, token_dim=16),
                  ValueError, r"adapter_config.json: token_dim is 16, expected 32 \(d_model"),
    "no_length": (lambda t5, d: _edit_config(d, num_virtual_tokens=None),
                  ValueError, r"adapter_config.json: field num_virtual_tokens is None, "
                              r"expected a positive integer"),
    "no_config": (lambda t5, d: (d / "adapter_config.json").unlink(),
                  FileNotFoundError, r"adapter_config.json: missing"),
    "bad_json": (lambda t5, d: (d / "adapter_config.json").write_text("{peft"),
                 ValueError, r"adapter_config.json: not valid JSON"),
    "no_weights": (lambda t5, d: (d / "adapter_model.safetensors").unlink(),
                   FileNotFoundError, r"adapter_model.safetensors: missing"),
    "pickled_only": (lambda t5, d: ((d / "adapter_model.safetensors").unlink(),
                                    (d / "adapter_model.bin").write_bytes(b"\x80\x04pickle")),
                     ValueError, r"adapter_model.bin: a pickled PyTorch file"),
    "wrong_shape": (lambda t5, d: _write_tensors(d, {
        "prompt_embeddings": np.zeros((P - 1, D_MODEL), np.float32)}),
        ValueError, r"adapter_model.safetensors: prompt_embeddings has shape \(4, 32\), "
                    r"expected \(5, 32\) \(num_virtual_tokens 5"),
    "wrong_name": (lambda t5, d: _write_tensors(d, {
        "prompt_encoder.weight": np.zeros((P, D_MODEL), np.float32)}),
        ValueError, r"adapter_model.safetensors: no tensor prompt_embeddings"),
    "int_dtype": (lambda t5, d: _write_tensors(d, {
        "prompt_embeddings": np.zeros((P, D_MODEL), np.int32)}),
        ValueError, r"adapter_model.safetensors: tensor prompt_embeddings has dtype I32"),
    "truncated": (lambda t5, d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]),
        ValueError, r"adapter_model.safetensors: tensor prompt_embeddings .* truncated"),
    "nan": (lambda t5, d: _write_tensors(d, {"prompt_embeddings": np.where(
        np.eye(P, D_MODEL) > 0, np.nan, 0).astype(np.float32)}),
        ValueError, r"adapter_model.safetensors: prompt_embeddings holds 5 NaN/inf values"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_file_and_field(t5, tmp_path, case):
    directory = tmp_path / "adapter"
    if case not in ("lora", "prefix_tuning"):
        prompts.save_peft(np.zeros((P, D_MODEL), np.float32), str(directory), str(t5[0]))
    spoil, error, match = REFUSALS[case]
    spoil(t5, directory)
    with pytest.raises(error, match=match) as caught:
        load_peft(str(directory), d_model=D_MODEL)
    assert str(directory) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_directory_and_bad_saves(t5, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: PEFT adapter directory does not exist"):
        load_peft(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"expected \[P, 32\] \(d_model of .*config.json\)"):
        prompts.save_peft(np.zeros((P, 16), np.float32), str(tmp_path / "a"), str(t5[0]))
    with pytest.raises(ValueError, match=r"refusing to save a prompt holding 1 NaN/inf"):
        prompts.save_peft(np.array([[np.nan, 0.0]], np.float32), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists()  # refused before anything is written
