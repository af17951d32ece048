"""Every embedding layout transformers 5 writes, read by `load_checkpoint` and written back.

transformers 5 ties `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head` to
`shared` unless a file holds them with other values, and scales the logits by
`scale_decoder_outputs`; transformers 4 decided both by `tie_word_embeddings`. Each
tiny model here has every tensor drawn independently, so that a tensor dropped or
put in the wrong place changes the logits; ours must match HF's within 1e-4.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

import prompt_jax  # noqa: E402
from prompt_jax.pytree import flatten  # noqa: E402
from prompt_jax.t5.model import T5  # noqa: E402

VOCAB, D_MODEL = 120, 32
COPIES = ("encoder.embed_tokens", "decoder.embed_tokens", "lm_head")

# name: (HF T5Config kwargs, the copies given their own parameter, the T5Config we expect:
# tie_embeddings, logits_scaled, separate_encoder_embedding, separate_decoder_embedding).
# `untie` builds the model with `config.tie_word_embeddings = False`, as a user who
# overrides transformers 5's forced tying does; that directory says tie_word_embeddings false.
LAYOUTS = {
    "t5_1_0": (dict(feed_forward_proj="relu"), (), (True, True, False, False)),
    "t5_1_1": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), ("lm_head",),
               (False, False, False, False)),
    # T5Config(tie_word_embeddings=False) in transformers 5: one table, unscaled logits.
    "tied_unscaled_gated": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False), (),
                            (True, False, False, False)),
    "tied_unscaled_relu": (dict(feed_forward_proj="relu", scale_decoder_outputs=False), (),
                           (True, False, False, False)),
    "tied_scaled_gated": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=True), (),
                          (True, True, False, False)),
    "untied_scaled_relu": (dict(feed_forward_proj="relu", tie_word_embeddings=False,
                                scale_decoder_outputs=True), ("lm_head",),
                           (False, True, False, False)),
    "untied_unscaled_relu": (dict(feed_forward_proj="relu", scale_decoder_outputs=False),
                             ("lm_head",), (False, False, False, False)),
    "own_encoder_table": (dict(feed_forward_proj="relu"), ("encoder.embed_tokens",),
                          (True, True, True, False)),
    "own_decoder_table_untied": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
                                 ("decoder.embed_tokens", "lm_head"),
                                 (False, False, False, True)),
    "all_own_unscaled": (dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                              untie=True), COPIES, (False, False, True, True)),
    "all_own_scaled": (dict(feed_forward_proj="relu", scale_decoder_outputs=True, untie=True),
                       COPIES, (False, True, True, True)),
}


def _randomize(model, seed: int) -> None:
    """Draw every distinct parameter independently (a tied one once, for all its names)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "layer_norm" in name
            p.copy_((1.0 if norm else 0.0) + (0.5 if norm else 0.2)
                    * torch.randn(p.shape, generator=gen))


def build(name: str, directory, seed: int = 0):
    """The HF model of layout `name`, saved to `directory` and read back by transformers."""
    kwargs, own, _ = LAYOUTS[name]
    kwargs = dict(kwargs)
    untie = kwargs.pop("untie", False)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4, dropout_rate=0.0, **kwargs)
    if untie:
        cfg.tie_word_embeddings = False
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    for copy in own:
        module = model.get_submodule(copy)
        if module.weight is model.shared.weight:  # tied on construction: give it its own
            module.weight = torch.nn.Parameter(torch.empty(VOCAB, D_MODEL))
    _randomize(model, seed)
    model.save_pretrained(directory)
    return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


def batch(seed: int = 1):
    rng = np.random.default_rng(seed)
    enc = np.zeros((3, 14), np.int32)
    tgt = np.zeros((3, 7), np.int32)
    for row, (n, m) in enumerate(((14, 7), (9, 3), (4, 5))):
        enc[row, : n - 1], enc[row, n - 1] = rng.integers(2, VOCAB, n - 1), 1
        tgt[row, : m - 1], tgt[row, m - 1] = rng.integers(2, VOCAB, m - 1), 1
    dec = np.concatenate([np.zeros_like(tgt[:, :1]), tgt[:, :-1]], axis=1)
    return enc, dec, tgt


def hf_logits(model, enc, dec) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(enc, dtype=torch.long),
                     attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                     decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()


def our_logits(config, params, enc, dec, tgt) -> np.ndarray:
    return np.asarray(T5(config).apply({"params": params}, enc, dec, tgt))


def expected_layout(config) -> tuple[bool, bool, bool, bool]:
    return (config.tie_embeddings, config.logits_scaled, config.separate_encoder_embedding,
            config.separate_decoder_embedding)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_hf_and_round_trips(name, tmp_path):
    hf = build(name, tmp_path / "hf")
    config, params = prompt_jax.load_checkpoint(str(tmp_path / "hf"))
    assert expected_layout(config) == LAYOUTS[name][2]
    enc, dec, tgt = batch()
    ref = hf_logits(hf, enc, dec)
    ours = our_logits(config, params, enc, dec, tgt)
    valid = tgt > 0
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)

    # save_hf writes what transformers reads back as the same model, and we read it back.
    prompt_jax.save_hf(config, params, str(tmp_path / "ours"))
    again = transformers.T5ForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    assert again.config.scale_decoder_outputs == config.logits_scaled
    np.testing.assert_allclose(hf_logits(again, enc, dec), ref, atol=1e-6, rtol=0)
    for n in ("shared",) + COPIES:
        np.testing.assert_array_equal(again.get_submodule(n).weight.detach().numpy(),
                                      hf.get_submodule(n).weight.detach().numpy(), err_msg=n)
    config2, params2 = prompt_jax.load_checkpoint(str(tmp_path / "ours"), config=config)
    assert config2 == config
    flat, flat2 = flatten(params), flatten(params2)
    assert set(flat) == set(flat2)
    for path, value in flat.items():
        np.testing.assert_array_equal(flat2[path], value, err_msg=path)


@pytest.mark.parametrize("tensor", ["shared", "encoder.embed_tokens", "decoder.embed_tokens",
                                    "lm_head"])
def test_perturbing_one_table_moves_our_logits_as_hfs(tensor, tmp_path):
    """With every table its own, each one changes HF's logits (`shared` none: nothing reads
    it) and ours the same way."""
    hf = build("all_own_unscaled", tmp_path / "a")
    enc, dec, tgt = batch()
    before = hf_logits(hf, enc, dec)
    with torch.no_grad():
        w = hf.get_submodule(tensor).weight
        w.add_(0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))
    hf.save_pretrained(tmp_path / "b")
    after = hf_logits(hf, enc, dec)
    config, params = prompt_jax.load_checkpoint(str(tmp_path / "b"))
    assert expected_layout(config) == LAYOUTS["all_own_unscaled"][2]
    ours = our_logits(config, params, enc, dec, tgt)
    valid = tgt > 0
    np.testing.assert_allclose(ours[valid], after[valid], atol=1e-4, rtol=0)
    moved = np.abs(after - before)[valid].max()
    if tensor == "shared":
        assert moved == 0
        np.testing.assert_array_equal(flatten(params)["token_embedder/embedding"],
                                      hf.shared.weight.detach().numpy())
    else:
        assert moved > 0.1, moved


def test_greedy_decoding_with_every_table_its_own_matches_hf_generate(tmp_path):
    from prompt_jax import decoding

    hf = build("all_own_scaled", tmp_path, seed=3)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    enc, _, _ = batch(seed=2)
    steps = 8
    tokens, _ = decoding.greedy_decode(T5(config), params, enc, steps)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(enc, dtype=torch.long),
                          attention_mask=torch.tensor(enc > 0, dtype=torch.long),
                          do_sample=False, num_beams=1, max_new_tokens=steps, min_new_tokens=0,
                          eos_token_id=1, pad_token_id=0, decoder_start_token_id=0).numpy()
    ref = np.pad(ref[:, 1:], ((0, 0), (0, steps + 1 - ref.shape[1])))
    np.testing.assert_array_equal(np.asarray(tokens), ref)


def _transformers_4_dir(src, dst, hf_config: dict, keep) -> None:
    """A directory as transformers 4 wrote it: config.json without scale_decoder_outputs,
    and of the embeddings only the tensors named in `keep`."""
    copies = {f"{n}.weight" for n in COPIES}
    tensors = {k: v for k, v in load_file(str(src / "model.safetensors")).items()
               if k not in copies - keep}
    for name in keep - set(tensors):  # 4.x's stacks always held the shared table
        tensors[name] = tensors["shared.weight"].copy()
    dst.mkdir()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("scale_decoder_outputs")
    cfg.update(hf_config)
    (dst / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name, tie, keep", [
    ("t5_1_1", False, {"lm_head.weight"}),
    ("t5_1_0", True, {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}),
])
def test_transformers_4_directory_still_loads(name, tie, keep, tmp_path):
    hf = build(name, tmp_path / "hf")
    _transformers_4_dir(tmp_path / "hf", tmp_path / "v4", {"tie_word_embeddings": tie}, keep)
    names = set(load_file(str(tmp_path / "v4" / "model.safetensors")))
    assert {n for n in names if "block" not in n and "norm" not in n} == {"shared.weight"} | keep
    config, params = prompt_jax.load_checkpoint(str(tmp_path / "v4"))
    assert expected_layout(config) == LAYOUTS[name][2]
    assert config.scale_logits is None  # as every named size: scaled exactly when tied
    enc, dec, tgt = batch()
    valid = tgt > 0
    np.testing.assert_allclose(our_logits(config, params, enc, dec, tgt)[valid],
                               hf_logits(hf, enc, dec)[valid], atol=1e-4, rtol=0)


def test_untied_config_without_lm_head_is_refused(tmp_path):
    build("t5_1_0", tmp_path / "hf")
    _transformers_4_dir(tmp_path / "hf", tmp_path / "v4", {"tie_word_embeddings": False}, set())
    with pytest.raises(ValueError, match=r"config.json: tie_word_embeddings is false .* holds no "
                                         r"lm_head.weight"):
        prompt_jax.load_checkpoint(str(tmp_path / "v4"))


def test_a_config_that_cannot_express_the_file_is_refused(tmp_path):
    build("own_decoder_table_untied", tmp_path / "hf")
    found, _ = prompt_jax.load_checkpoint(str(tmp_path / "hf"))
    one_table = found.replace(separate_decoder_embedding=False)
    with pytest.raises(ValueError, match=r"hf: decoder.embed_tokens.weight holds values other than "
                                         r"shared.weight, but the config has "
                                         r"separate_decoder_embedding=False"):
        prompt_jax.load_checkpoint(str(tmp_path / "hf"), config=one_table)
    tied = found.replace(tie_embeddings=True, scale_logits=False)
    with pytest.raises(ValueError, match=r"lm_head.weight holds values other than shared.weight, "
                                         r"but the config has tie_embeddings=True"):
        prompt_jax.load_checkpoint(str(tmp_path / "hf"), config=tied)
    scaled = found.replace(scale_logits=True)
    with pytest.raises(ValueError, match=r"config.json: scale_decoder_outputs gives "
                                         r"logits_scaled=False, but the config has "
                                         r"logits_scaled=True"):
        prompt_jax.load_checkpoint(str(tmp_path / "hf"), config=scaled)


def test_a_config_with_more_tables_than_the_file_gets_copies(tmp_path):
    """A tied file read into a model with tables of its own: copies of `shared`, same logits."""
    hf = build("tied_unscaled_gated", tmp_path / "hf")
    found, _ = prompt_jax.load_checkpoint(str(tmp_path / "hf"))
    wide = found.replace(tie_embeddings=False, scale_logits=False,
                         separate_encoder_embedding=True, separate_decoder_embedding=True)
    config, params = prompt_jax.load_checkpoint(str(tmp_path / "hf"), config=wide)
    flat = flatten(params)
    shared = flat["token_embedder/embedding"]
    np.testing.assert_array_equal(flat["encoder/token_embedder/embedding"], shared)
    np.testing.assert_array_equal(flat["decoder/token_embedder/embedding"], shared)
    np.testing.assert_array_equal(flat["decoder/logits_dense/kernel"], shared.T)
    enc, dec, tgt = batch()
    valid = tgt > 0
    np.testing.assert_allclose(our_logits(config, params, enc, dec, tgt)[valid],
                               hf_logits(hf, enc, dec)[valid], atol=1e-4, rtol=0)


def test_unknown_tensor_and_missing_table_are_named(tmp_path):
    build("t5_1_0", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "encoder.extra.weight": np.zeros((2, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match=r"hf: unknown tensor 'encoder.extra.weight' with shape "
                                         r"\(2, 3\)"):
        prompt_jax.load_checkpoint(str(tmp_path / "hf"))
    save_file({k: v for k, v in tensors.items() if k != "shared.weight"}, str(path))
    with pytest.raises(ValueError, match=r"hf: no shared.weight .*token embeddings are missing"):
        prompt_jax.load_checkpoint(str(tmp_path / "hf"))
