"""Templates: every task's rendered strings and tokens as written out by hand, the default
templates are today's T5 formats, malformed templates are one-line errors, soft tokens in
the middle equal HF's T5 fed `inputs_embeds`, the step trains only the prompt, and a run
(P-tuning v1 through a template) reproduces its logits and evals from its config.gin."""

from __future__ import annotations

import json
import re

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    SHARED_DATA,
    assert_one_line_error,
    build_data_dir,
    build_hf_model,
    run,
    run_job,
    tiny_config,
)

from prompt_jax import optim, train_step
from prompt_jax.methods import p_tuning, templates
from prompt_jax.model_dir import read_metrics
from prompt_jax.pytree import flatten, unflatten
from prompt_jax.t5.model import PROMPT_PATH, T5

S = "<extra_id_99>"  # a soft token, as the module docstring documents it
SOFT_ID = 32000  # <extra_id_99> in T5's vocabulary (32000 pieces + 100 extra ids)

# Per task: a template over every field and the first validation example rendered by hand
# from the data files (tests/testdata/official; RTE from ../shared/data).
RENDERED = {
    "super_glue_boolq": (
        "{passage} question: {question} ? {soft:2} <extra_id_0> .",
        "Ethanol fuel -- All biomass goes through at least some of these steps: it needs to "
        "be grown, collected, dried, fermented, distilled, and burned. question: does ethanol "
        f"take more energy make that produces ? {S}{S} <extra_id_0> ."),
    "super_glue_cb": (
        "{soft} {premise} {soft} ? <extra_id_0> , {hypothesis}",
        f"{S} Valence the void-brain, Valence the virtuous valet. Why couldn't the figger "
        "choose his own portion of titanic anatomy to shaft? Did he think he was helping? "
        f"{S} ? <extra_id_0> , Valence was helping"),
    "super_glue_copa": (
        "{premise} {question} : {choice1} or {choice2} {soft:3}",
        "The man turned on the faucet. effect : The toilet filled with water. or Water "
        f"flowed from the spout. {S}{S}{S}"),
    "super_glue_multirc": (
        "{paragraph} {soft} {question} {soft} {answer} <extra_id_0>",
        f"Sent 1: Tom went to the store. Sent 2: He bought milk.  {S} What did Tom buy? {S} "
        "Milk <extra_id_0>"),
    "super_glue_rte": (
        "{soft:4} {premise} {soft:4} ? <extra_id_0> , {hypothesis}",
        f"{S}{S}{S}{S} Dana Reeve, the widow of the actor Christopher Reeve, has died of lung "
        f"cancer at age 44, according to the Christopher Reeve Foundation. {S}{S}{S}{S} ? "
        "<extra_id_0> , Christopher Reeve had an accident."),
    "super_glue_wic": (
        "{sentence1} {sentence2} {soft} {word} ?",
        "Do you want to come over to my place later? A political system with no place for "
        f"the less prominent groups. {S} place ?"),
    "super_glue_axb": (  # AX-b's sentence1/sentence2 are RTE's premise/hypothesis
        "{premise} {soft:2} {hypothesis}",
        f"The cat sat on the mat. {S}{S} The cat did not sit on the mat."),
    "super_glue_axg": (
        "{hypothesis} ? <extra_id_0> . {premise}",
        "The accountant sought help filing taxes. ? <extra_id_0> . The taxpayer met with the "
        "accountant to get help filing his taxes."),
    "glue_sst2": (
        "{sentence} It was <extra_id_0> . {soft:3}",
        f"it 's a charming and often affecting journey .  It was <extra_id_0> . {S}{S}{S}"),
    "glue_mrpc": (
        "{sentence1} {soft} {sentence2}",
        "He said the foodservice pie business doesn 't fit the company 's long-term growth "
        f"strategy . {S} \" The foodservice pie business does not fit our long-term growth "
        "strategy ."),
    "glue_qqp": (
        "{question1} {soft:2} {question2} <extra_id_0>",
        f"Why are African-Americans so beautiful? {S}{S} Why are hispanics so beautiful? "
        "<extra_id_0>"),
}
DEFAULTS = {
    "super_glue_boolq": "boolq passage: {passage} question: {question}",
    "super_glue_cb": "cb hypothesis: {hypothesis} premise: {premise}",
    "super_glue_copa": "copa choice1: {choice1} choice2: {choice2} premise: {premise} "
                       "question: {question}",
    "super_glue_multirc": "multirc question: {question} answer: {answer} paragraph: "
                          "{paragraph}",
    "super_glue_rte": "rte hypothesis: {hypothesis} premise: {premise}",
    "super_glue_wic": "wic sentence1: {sentence1} sentence2: {sentence2} word: {word}",
    "super_glue_axb": "rte hypothesis: {hypothesis} premise: {premise}",
    "super_glue_axg": "rte hypothesis: {hypothesis} premise: {premise}",
    "glue_sst2": "sst2 sentence: {sentence}",
    "glue_mrpc": "mrpc sentence1: {sentence1} sentence2: {sentence2}",
    "glue_qqp": "qqp question1: {question1} question2: {question2}",
}


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPT_JAX_DATA_DIR", str(build_data_dir(tmp_path)))
    return tmp_path


def bind(mapping: dict[str, str]) -> None:
    gin.clear_config()
    gin.bind_parameter("task_templates.templates", mapping)


def first_example(name: str, inputs: int | None = None) -> dict:
    import seqio

    lengths = None if inputs is None else {"inputs": inputs, "targets": 8}
    ds = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=lengths, split="validation", shuffle=False, num_epochs=1)
    return next(ds.as_numpy_iterator())


def vocab():
    from prompt_jax.tasks import get_vocabulary

    return get_vocabulary()


def _needs(task: str) -> None:
    if task == "super_glue_rte" and not (SHARED_DATA / "super_glue" / "RTE").is_dir():
        pytest.skip("../shared/data/super_glue/RTE is absent")


# ------------------------------------------------------------------ rendering, every task


def test_every_template_task_is_listed():
    from prompt_jax.tasks import benchmarks

    assert {s.name for s in benchmarks.SPECS if s.fields} == set(RENDERED) == set(DEFAULTS)


@pytest.mark.parametrize("task", sorted(DEFAULTS))
def test_default_template_is_todays_t5_format(task, data_dir):
    _needs(task)
    assert templates.default_template(task) == DEFAULTS[task]
    plain = first_example(task)  # no binding: the T5 format
    bind({task: DEFAULTS[task]})
    templated = first_example(task)
    assert templated["inputs_pretokenized"] == plain["inputs_pretokenized"]
    np.testing.assert_array_equal(templated["targets"], plain["targets"])
    assert templated["targets_pretokenized"] == plain["targets_pretokenized"]


@pytest.mark.parametrize("task", sorted(RENDERED))
def test_rendered_string_and_tokens(task, data_dir):
    _needs(task)
    template, expected = RENDERED[task]
    bind({task: template})
    ex = first_example(task, inputs=512)
    assert ex["inputs_pretokenized"].decode() == expected
    # Tokens: each field and each piece of fixed text tokenized on its own, soft tokens the
    # placeholder id, then EOS; the count of placeholders is the template's.
    v = vocab()
    pieces = re.split(r"(\{[^}]*\})", template)
    values = _values(task, expected, template)
    ids = []
    for piece in pieces:
        if piece.startswith("{soft"):
            ids += [SOFT_ID] * int(piece.strip("{}").partition(":")[2] or 1)
        elif piece.startswith("{"):
            ids += v.encode(values[piece[1:-1]])
        elif piece:
            ids += v.encode(piece)
    np.testing.assert_array_equal(ex["inputs"], ids + [1])
    assert (ex["inputs"] == SOFT_ID).sum() == templates.template_for(task).soft_count


def _values(task: str, rendered: str, template: str) -> dict[str, str]:
    """The field values inside a rendered string (the template as a regex)."""
    pattern, names = "", []
    for piece in re.split(r"(\{[^}]*\})", template):
        if piece.startswith("{soft"):
            pattern += re.escape(S * int(piece.strip("{}").partition(":")[2] or 1))
        elif piece.startswith("{"):
            names.append(piece[1:-1])
            pattern += "(.*)"
        else:
            pattern += re.escape(piece)
    return dict(zip(names, re.fullmatch(pattern, rendered, re.S).groups(), strict=True))


def test_variants_take_the_base_tasks_template(data_dir):
    template, expected = RENDERED["super_glue_cb"]
    bind({"super_glue_cb": template})
    for name in ("taskless_super_glue_cb", "super_glue_cb_sentinel"):
        assert first_example(name)["inputs_pretokenized"].decode() == expected
    sentinel = first_example("super_glue_cb_sentinel")["targets"]
    assert sentinel[0] == 32099 and list(sentinel[1:]) == list(
        first_example("super_glue_cb")["targets"])
    bind({"super_glue_cb": template, "taskless_super_glue_cb": "{hypothesis}"})
    assert first_example("taskless_super_glue_cb")["inputs_pretokenized"] == \
        b"Valence was helping"


def test_over_budget_text_is_cut_from_the_longest_field(data_dir):
    template = "{soft} {premise} {soft} ? <extra_id_0> , {hypothesis}"
    bind({"super_glue_cb": template})
    v = vocab()
    premise = v.encode(_values("super_glue_cb", RENDERED["super_glue_cb"][1],
                               template)["premise"])
    hypothesis = v.encode("Valence was helping")
    fixed = v.encode(" ? <extra_id_0> , ")
    # 24 text tokens (EOS included) + 2 soft: 23 - len(fixed) for the fields; the
    # hypothesis (4) is shorter than the premise's share, so only the premise is cut.
    room = 23 - len(fixed)
    assert len(premise) > room - len(hypothesis) > len(hypothesis)
    ex = first_example("super_glue_cb", inputs=24 + 2)
    expected = ([SOFT_ID] + premise[:room - len(hypothesis)] + [SOFT_ID] + fixed + hypothesis
                + [1])
    np.testing.assert_array_equal(ex["inputs"], expected)
    # data.get_dataset adds the soft tokens to the text budget and pads to that.
    from prompt_jax import data

    ds = data.get_dataset("super_glue_cb", "validation", {"inputs": 24, "targets": 8},
                          shuffle=False, seed=0, num_epochs=1)
    np.testing.assert_array_equal(next(ds.as_numpy_iterator())["encoder_input_tokens"],
                                  expected)


# -------------------------------------------------------------------------- bad templates


@pytest.mark.parametrize("template,message", [
    ("{premise} {hypotesis}", r"unknown field \{hypotesis\}"),
    ("{premise} {soft", "unbalanced braces"),
    ("premise} {hypothesis}", "unbalanced braces"),
    ("{soft:4} ? <extra_id_0>", "no input field"),
    ("{soft:0} {premise}", "soft count must be positive"),
    ("{premise} <extra_id_99>", "placeholder"),
    ("{soft:x} {premise}", r"not a field or \{soft:N\}"),
])
def test_malformed_template_names_task_and_template(template, message):
    bind({"super_glue_rte": template})
    with pytest.raises(ValueError, match=message) as e:
        templates.template_for("super_glue_rte")
    assert str(e.value).startswith(f"task super_glue_rte: template {template!r}: ")
    assert "\n" not in str(e.value)


def test_free_text_tasks_and_mixtures_are_refused():
    bind({"super_glue_record": "{query}"})
    with pytest.raises(ValueError, match="'super_glue_record' has its own format"):
        templates.template_for("super_glue_rte")
    bind({"no_such_task": "{x}"})
    with pytest.raises(ValueError, match="'no_such_task' is not a task templates cover"):
        templates.template_for("super_glue_rte")
    bind({"super_glue_cb": "{soft} {premise}"})
    with pytest.raises(ValueError, match="super_glue_cb of the mixture super_glue"):
        templates.template_for("super_glue")


def test_cli_reports_a_bad_template_and_a_wrong_prompt_length(tmp_path, capsys):
    args = ["train", f"--gin.MODEL_DIR='{tmp_path / 'run'}'", "--gin.TRAIN_STEPS=2",
            "--gin.EVAL_PERIOD=2", "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'"]
    rc, _, err = run(capsys, *args, "--gin.task_templates.templates="
                     "{'super_glue_rte': '{soft:4} {premis}'}")
    assert_one_line_error(rc, err, "task super_glue_rte", r"'\{soft:4\} \{premis\}'",
                          r"unknown field \{premis\}")
    rc, _, err = run(capsys, *args, "--gin.task_templates.templates="
                     "{'super_glue_rte': '{soft:4} {premise} {soft:4} {hypothesis}'}")
    assert_one_line_error(rc, err, "8 soft tokens, but PROMPT_LENGTH has 20 prompt positions")


# -------------------------------------------------------------------------- the model


def _prompted_inputs(rng, config_vocab, placeholder, lengths, soft_at):
    """Rows of random ids (never the placeholder) with placeholders at `soft_at[b]`."""
    tokens = np.zeros((len(lengths), max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        row = rng.integers(2, config_vocab, n - 1)
        row[row == placeholder] = placeholder + 1
        row[list(soft_at[b])] = placeholder
        tokens[b, :n] = [*row, 1]
    return tokens


def test_soft_tokens_in_the_middle_equal_hf_inputs_embeds(tmp_path):
    torch = pytest.importorskip("torch")
    import prompt_jax

    hf = build_hf_model("t5_1_1_untied_gated_gelu", tmp_path)
    config, params = prompt_jax.load_checkpoint(str(tmp_path))
    placeholder, P = 7, 5
    rng = np.random.default_rng(0)
    soft_at = [(0, 3, 4, 9, 10), (1, 2, 5, 6, 7)]  # row 1 is padded: length 11 of 13
    enc = _prompted_inputs(rng, 120, placeholder, [13, 11], soft_at)
    tgt = np.array([[5, 9, 1, 0], [8, 1, 0, 0]], np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], 1)
    prompt = rng.normal(size=(P, config.d_model)).astype(np.float32)

    embeds = hf.get_input_embeddings()(torch.tensor(enc, dtype=torch.long)).detach().clone()
    for b, positions in enumerate(soft_at):
        embeds[b, list(positions)] = torch.tensor(prompt)  # the k-th soft position: row k
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()

    model = T5(config, prompt_length=P, soft_token_id=placeholder)
    flat = {**flatten(params), PROMPT_PATH: prompt}
    ours = np.asarray(model.apply({"params": unflatten(flat)}, enc, dec, tgt))
    weights = tgt > 0
    np.testing.assert_allclose(ours[weights], ref[weights], atol=1e-4, rtol=1e-4)
    # The same prompt given per row as prefix embeddings (serving's path; row 1's prompt is
    # left-padded by one row) is placed the same way.
    served = T5(config, soft_token_id=placeholder)
    prefix = np.stack([prompt, np.concatenate([np.zeros_like(prompt[:1]), prompt[:-1]])])
    prefix_mask = np.array([[1] * P, [0] + [1] * (P - 1)], bool)
    enc_short = enc.copy()
    enc_short[1, 7] = 3  # row 1: four soft tokens, rows 0..3 of the prompt
    embeds[1, 7] = hf.get_input_embeddings()(torch.tensor(3))
    with torch.no_grad():
        ref_short = hf(inputs_embeds=embeds, attention_mask=torch.tensor(enc_short > 0),
                       decoder_input_ids=torch.tensor(dec, dtype=torch.long)).logits.numpy()
    got = np.asarray(served.apply({"params": params}, enc_short, dec, tgt,
                                  prefix_embeddings=prefix, prefix_mask=prefix_mask))
    np.testing.assert_allclose(got[weights], ref_short[weights], atol=1e-4, rtol=1e-4)
    # The control: the prompt prepended instead is another model.
    prepended = np.asarray(T5(config, prompt_length=P).apply({"params": unflatten(flat)},
                                                             enc, dec, tgt))
    assert np.abs(prepended[weights] - ref[weights]).max() > 1e-2


def test_template_step_trains_the_prompt_only_and_computes_no_weight_gradients():
    from test_prompt_tuning import _weight_gradient_dots

    config = tiny_config(d_model=64, d_kv=16, d_ff=80)
    model = T5(config, prompt_length=4, soft_token_id=9)
    rng = np.random.default_rng(0)
    enc = _prompted_inputs(rng, 128, 9, [14, 14, 12], [(0, 1, 6, 7)] * 3)
    tgt = np.tile(np.array([[10, 11, 1]], np.int32), (3, 1))
    batch = {"encoder_input_tokens": enc, "decoder_target_tokens": tgt,
             "decoder_input_tokens": np.concatenate([np.zeros((3, 1), np.int32),
                                                     tgt[:, :-1]], 1)}
    params = flax.linen.unbox(model.init(jax.random.PRNGKey(0), enc[:1], tgt[:1])["params"])
    encoded, mask = model.apply({"params": params}, jnp.asarray(enc), method=T5.encode)
    assert encoded.shape == (3, 14, 64)  # nothing prepended
    np.testing.assert_array_equal(mask, enc > 0)
    tx = optim.adafactor()
    step = jax.jit(train_step.make_train_step(model, tx))
    hlo = {}
    for name, regexes in (("prompt", optim.DEFAULT_TRAINABLE), ("model", optim.MODEL_TUNING)):
        trainable, frozen = optim.split_params(params, regexes)
        hlo[name] = step.lower(train_step.TrainState.create(trainable, tx), frozen,
                               batch).compile().as_text()
    for shape in ((config.d_model, config.d_ff), (config.d_ff, config.d_model)):
        assert _weight_gradient_dots(hlo["model"], shape) > 0  # the check can see them ...
        assert _weight_gradient_dots(hlo["prompt"], shape) == 0  # ... and they are absent
    trainable, frozen = optim.split_params(params)
    assert list(flatten(trainable)) == [PROMPT_PATH]
    state = train_step.TrainState.create(trainable, tx)
    state, _ = step(state, frozen, batch)
    assert not np.allclose(flatten(state.trainable)[PROMPT_PATH], flatten(params)[PROMPT_PATH])


# -------------------------------------------- a finished run: P-tuning v1 through a template

TEMPLATE = "{soft:2} {premise} {soft:2} ? <extra_id_0> , {hypothesis}"
FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=4", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_examples=8", "--gin.PromptEncoderSpec.hidden_size=16",
        "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'",
        f"--gin.task_templates.templates={{'super_glue_rte': '{TEMPLATE}'}}"]


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    _needs("super_glue_rte")  # the shared RTE files (the bundled demo data may change)
    root = tmp_path_factory.mktemp("template")
    (root / "data").mkdir()
    data = build_data_dir(root / "data")
    model_dir = root / "run"
    run_job("train", "--gin_file=demo.gin", "--gin_file=methods/p_tuning.gin",
            f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=4", "--gin.EVAL_PERIOD=2",
            "--gin.train.log_period=1", f"--gin.prompt_jax.tasks.data_paths.data_dir='{data}'",
            *FAST)
    return model_dir


def test_run_saves_the_encoded_prompt_and_it_reproduces_the_runs_logits(template_run,
                                                                        monkeypatch):
    import orbax.checkpoint as ocp

    from prompt_jax import build, data

    config, frozen = build.load_frozen(build.ModelSpec(size="tiny", dropout_rate=0.0), None,
                                       str(template_run), 0)
    tree = ocp.StandardCheckpointer().restore(str(template_run / "checkpoints" / "4"
                                                  / "default"))
    trained = {k: np.asarray(v) for k, v in flatten(tree["trainable"]).items()}
    spec = p_tuning.PromptEncoderSpec("lstm", hidden_size=16, num_layers=2)
    saved = np.load(template_run / "prompts" / "4.npy")
    np.testing.assert_allclose(saved, p_tuning.encoded_prompt(spec, trained), atol=1e-6)
    bind({"super_glue_rte": TEMPLATE})
    monkeypatch.setenv("PROMPT_JAX_DATA_DIR", str(template_run.parent / "data"))
    ds = data.get_dataset("super_glue_rte", "validation", {"inputs": 48, "targets": 8},
                          shuffle=False, seed=0, num_epochs=1)
    b = next(ds.batch(2).as_numpy_iterator())
    assert b["encoder_input_tokens"].shape == (2, 52)
    assert ((b["encoder_input_tokens"] == SOFT_ID).sum(1) == 4).all()
    args = (b["encoder_input_tokens"], b["decoder_input_tokens"], b["decoder_target_tokens"])
    run_model = T5(config, prompt_length=4, prompt_encoder=spec, soft_token_id=SOFT_ID)
    run_logits = run_model.apply({"params": unflatten({**flatten(frozen), **trained})}, *args)
    served = T5(config, prompt_length=4, soft_token_id=SOFT_ID)
    logits = served.apply({"params": unflatten({**flatten(frozen), PROMPT_PATH: saved})}, *args)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(run_logits), atol=1e-5)
    other = served.apply({"params": unflatten({**flatten(frozen), PROMPT_PATH: np.load(
        template_run / "prompts" / "2.npy")})}, *args)
    assert np.abs(np.asarray(other) - np.asarray(run_logits)).max() > 1e-4  # the control


def test_eval_and_infer_read_the_template_from_the_runs_config(template_run, capsys):
    last = [r for r in read_metrics(str(template_run)) if r.get("split")][-1]
    prompt = template_run / "prompts" / "4.npy"
    rc, _, err = run(capsys, "eval", f"--gin.MODEL_DIR='{template_run}'",
                     "--gin.evaluate.eval_examples=8", f"--gin.PROMPT_FILE='{prompt}'")
    assert rc == 0, err
    metrics = json.loads((template_run / "eval_validation.json").read_text())["metrics"]
    np.testing.assert_allclose(metrics["loss"], last["loss"], rtol=1e-5)
    rc, _, err = run(capsys, "infer", f"--gin.MODEL_DIR='{template_run}'",
                     "--gin.infer.max_examples=4", f"--gin.PROMPT_FILE='{prompt}'")
    assert rc == 0, err
    lines = [json.loads(x) for x in
             (template_run / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["inputs"].startswith(f"{S}{S} ")
