"""`prompt-jax serve` for the P-tuning family's runs: a deep prompt (P-tuning v2, prefix
tuning) is served as part of the model and its outputs are `infer`'s with the same file;
a MODEL_DIR's best_deep_prompt.npz and a multi-task run's per-task prompts are found by
default; a deep prompt is refused at run time (it is not a per-request prompt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import post_all, save_random_backbone

httpx = pytest.importorskip("httpx")

from prompt_jax import infer, prompts, serve  # noqa: E402
from prompt_jax.methods import deep_prompts  # noqa: E402

E = 32
LIMITS = serve.Limits(max_input_length=24, max_decode_length=8, decode_length=8)
BATCHING = serve.BatchingSpec(max_batch_size=16, max_wait_ms=50, batch_buckets=(4, 16),
                              length_buckets=(24,))
TEXTS = ["rte hypothesis: a cat sat. premise: cats sit.", "hello world",
         "The weather is nice today.", "sst2 sentence: a delightful film"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random tiny T5 with T5's vocabulary, a P-tuning v2 deep prompt (.npz) for it, a
    prefix-tuning one, and a prompt (.npy)."""
    root = tmp_path_factory.mktemp("serve_methods")
    rng = np.random.default_rng(0)
    config = save_random_backbone(root / "backbone", rng, d_model=E)
    for name, method in (("v2", "p_tuning_v2"), ("prefix", "prefix_tuning")):
        spec = deep_prompts.DeepPromptSpec(method, 6)
        deep_prompts.save_deep_prompt(str(root / f"{name}.npz"), spec, config,
                                      rng.normal(size=(6, spec.width(config))).astype(np.float32))
    prompts.save_prompt(str(root / "soft.npy"), rng.normal(size=(4, E)).astype(np.float32))
    prompts.save_prompt(str(root / "soft7.npy"), rng.normal(size=(7, E)).astype(np.float32))
    return root


def serving_client(**kwargs):
    service = serve.load_service(limits=LIMITS, batching=BATCHING, **kwargs)
    running = serve.run_in_thread(serve.create_app(service))
    return running, httpx.Client(base_url=running.url, timeout=300)


@pytest.mark.parametrize("deep", ["v2", "prefix"])
def test_a_served_deep_prompt_gives_infers_outputs(files, tmp_path, deep):
    """/v1/generate and /v1/rank under a served deep prompt (with and without a soft prompt
    beside it) equal `infer` with the same files; without the deep prompt they differ."""
    root = files
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in TEXTS))
    run = dict(initial_checkpoint=str(root / "backbone"),
               task_feature_lengths={"inputs": LIMITS.max_input_length, "targets": 8},
               batch_size=4, input_file=str(inputs), output_file=str(tmp_path / "out.jsonl"))
    deep_file = str(root / f"{deep}.npz")
    expected = {"deep": infer.infer(**run, prompt_files=[deep_file])}
    for name in ("soft", "soft7"):
        expected[name] = infer.infer(**run, prompt_files=[deep_file, str(root / f"{name}.npy")])
    soft_only = infer.infer(**run, prompt_file=str(root / "soft.npy"))

    running, client = serving_client(
        initial_checkpoint=str(root / "backbone"),
        prompt_files={"deep": deep_file, "soft": str(root / "soft.npy"),
                      "soft7": str(root / "soft7.npy")})
    try:
        listed = {p["name"]: p for p in client.get("/v1/prompts").json()["prompts"]}
        assert listed["deep"]["kind"] == "deep_prompt" and listed["deep"]["length"] == 0
        assert client.get("/v1/health").json()["model"]["deep_prompt"] == str(root /
                                                                              f"{deep}.npz")
        # Concurrent requests with prompts of three lengths (0, 4, 7), batched together
        # (left-padded to one width): each gets what infer gives it alone.
        answers = post_all(str(client.base_url), [
            ("/v1/generate", {"prompt": name, "inputs": TEXTS}) for name in expected])
        assert max(int(a.headers["x-batch-requests"]) for a in answers) >= 2
        for name, answer in zip(expected, answers, strict=True):
            outputs, records = answer.json()["outputs"], expected[name]
            assert [o["prediction"] for o in outputs] == [r["prediction"] for r in records]
            np.testing.assert_allclose([o["score"] for o in outputs],
                                       [r["score"] for r in records], atol=1e-4)
        assert [r["prediction"] for r in expected["soft"]] != [r["prediction"]
                                                               for r in soft_only]
        ranked = client.post("/v1/rank", json={"prompt": "soft7", "inputs": TEXTS[:2],
                                               "candidates": ["yes", "no"]}).json()
        assert ranked["outputs"][0]["prediction"] in ("yes", "no")
        # A deep prompt cannot be added per request: 422 naming the file.
        answer = client.post("/v1/prompts", json={"name": "other", "path": str(root / "v2.npz")})
        assert answer.status_code == 422 and answer.json()["field"] == "path"
        assert "part of the served model" in answer.json()["error"]
    finally:
        client.close()
        running.stop()


def infer_one_input(files, tmp_path, **prompts):
    """`infer` of one input line (an INPUT_FILE in tmp_path) on the backbone."""
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"inputs": TEXTS[0]}) + "\n")
    return infer.infer(initial_checkpoint=str(files / "backbone"),
                       task_feature_lengths={"inputs": 24, "targets": 8},
                       input_file=str(inputs), output_file=str(tmp_path / "out.jsonl"),
                       **prompts)


def test_infer_mixes_prompt_lengths_under_a_deep_prompt(files, tmp_path):
    """An ensemble of prompts of lengths 4 and 7 beside a P-tuning v2 deep prompt (one
    pass, the shorter left-padded) gives each prompt the output it has alone."""
    v2, soft, soft7 = (str(files / n) for n in ("v2.npz", "soft.npy", "soft7.npy"))
    both, = infer_one_input(files, tmp_path, prompt_files=[v2, soft, soft7])
    assert sorted(both["predictions"]) == ["prompt_1", "prompt_2"]
    for name, path in (("prompt_1", soft), ("prompt_2", soft7)):
        alone, = infer_one_input(files, tmp_path, prompt_files=[v2, path])
        assert both["predictions"][name] == alone["prediction"]
        # A few float32 ulps of a ~-38 sum apart (1.9e-5 seen under load): relative.
        np.testing.assert_allclose(both["scores"][name], alone["score"], rtol=2e-6)


def test_two_deep_prompts_are_refused(files):
    with pytest.raises(ValueError, match="2 deep prompts .* at most one"):
        serve.load_service(initial_checkpoint=str(files / "backbone"),
                           prompt_files={"a": str(files / "v2.npz"),
                                         "b": str(files / "prefix.npz")})


def test_a_runs_deep_prompt_and_per_task_prompts_are_served_by_default(files, tmp_path):
    """MODEL_DIR/best_deep_prompt.npz beside best_prompt.npy; a multi-task run's
    task_prompts/<task>/best_prompt.npy, one prompt per task with that task (the default
    candidates of /v1/rank)."""
    import seqio

    from prompt_jax import model_dir as model_dir_lib
    from prompt_jax.methods import multitask  # noqa: F401

    run_dir = tmp_path / "p_tuning_v2_run"
    run_dir.mkdir()
    (run_dir / "best_deep_prompt.npz").write_bytes((files / "v2.npz").read_bytes())
    service = serve.load_service(initial_checkpoint=str(files / "backbone"),
                                 model_dir=str(run_dir), limits=LIMITS, batching=BATCHING)
    assert [(p.name, p.kind) for p in service.registry.all()] == [("best_deep_prompt",
                                                                    "deep_prompt")]
    assert service.engine.deep_prompt_source == str(run_dir / "best_deep_prompt.npz")

    mixture = "test_serve_rte_sst2"
    if mixture in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(mixture)
    seqio.MixtureRegistry.add(mixture, [("super_glue_rte", 1.0), ("glue_sst2", 1.0)])
    try:
        multi = tmp_path / "multitask_run"
        soft = np.load(files / "soft.npy")
        for i, task in enumerate(("super_glue_rte", "glue_sst2")):
            prompts.save_prompt(model_dir_lib.task_prompt_at(str(multi), task), soft + i)
        service = serve.load_service(initial_checkpoint=str(files / "backbone"),
                                     model_dir=str(multi), mixture_or_task_name=mixture,
                                     limits=LIMITS, batching=BATCHING)
        got = {p.name: p for p in service.registry.all()}
        assert sorted(got) == ["glue_sst2", "super_glue_rte"]
        assert all(p.task == name for name, p in got.items())
        np.testing.assert_array_equal(got["glue_sst2"].array, soft + 1)
        assert service.engine.deep_prompt_source is None
    finally:
        seqio.MixtureRegistry.remove(mixture)


def test_serve_reads_a_runs_config():
    """`prompt-jax serve --gin.MODEL_DIR=X` with no gin file: runs/serve.gin, then X's
    config.gin (its backbone, task and method), as eval and infer do."""
    from prompt_jax import cli

    assert cli.run_config_files("serve", ["MODEL_DIR='/nonexistent'"]) == []
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/config.gin", "w").close()
        assert cli.run_config_files("serve", [f"MODEL_DIR='{d}'"]) == ["runs/serve.gin",
                                                                       f"{d}/config.gin"]


def test_templated_prompts_are_refused_where_inputs_are_raw(files, tmp_path):
    """A task whose template places the prompt inside the input: `serve` (which puts prompts
    before raw inputs) and `infer` with an INPUT_FILE refuse its prompt rather than prepend it."""
    import gin

    from prompt_jax import data  # noqa: F401  (registers the tasks)

    gin.bind_parameter("task_templates.templates", {
        "super_glue_rte": "{soft:4} rte hypothesis: {hypothesis} premise: {premise}"})
    with pytest.raises(ValueError, match="prompt 'soft' .* is for super_glue_rte, whose "
                                         "template places the prompt inside the input"):
        serve.load_service(initial_checkpoint=str(files / "backbone"),
                           prompt_files={"soft": str(files / "soft.npy")},
                           mixture_or_task_name="super_glue_rte")
    with pytest.raises(ValueError, match="in.jsonl: super_glue_rte's template places the "
                                         "prompt inside the input"):
        infer_one_input(files, tmp_path, mixture_or_task_name="super_glue_rte",
                        prompt_file=str(files / "soft.npy"))
    gin.clear_config()  # without the template both serve it
    serve.load_service(initial_checkpoint=str(files / "backbone"),
                       prompt_files={"soft": str(files / "soft.npy")},
                       mixture_or_task_name="super_glue_rte")
