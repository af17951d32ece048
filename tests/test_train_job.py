"""The train / eval / infer jobs through the CLI, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import DEMO, cli, run
from conftest import train_args as conftest_train_args

# Small and fast: the demo config on a random 2+2-layer T5, short inputs, dropout off.
FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 44, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=4", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_examples=24", "--gin.evaluate.eval_examples=24"]


def read_metrics(model_dir) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_args(model_dir, steps=8, period=4, settings=FAST):
    return conftest_train_args(model_dir, steps, period, settings)


def job(capsys, *args: str) -> str:
    """`prompt-jax ARGS` in process (`cli.main`, what the console script calls; the tests
    about the process itself, e.g. a kill and resume, start one) -> its stdout."""
    rc, out, err = run(capsys, *args)
    assert rc == 0, f"prompt-jax {' '.join(args)} failed ({rc}):\n{out}\n{err}"
    return out


def test_demo_writes_what_the_readme_promises(demo_run):
    model_dir, proc = demo_run
    assert "train:" in proc.stderr and "step" in proc.stderr  # the progress bar
    assert "step 8 validation: accuracy=" in proc.stderr
    for name in ("config.gin", "best_prompt.npy", "best.json", "prompts/4.npy", "prompts/8.npy",
                 "checkpoints/4", "checkpoints/8"):
        assert (model_dir / name).exists(), name
    records = read_metrics(model_dir)
    train_lines = [r for r in records if "split" not in r]
    eval_lines = [r for r in records if r.get("split") == "validation"]
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["objective"]) for r in train_lines)
    # `loss` means cross-entropy per target token on train and eval lines alike.
    assert all(r["loss"] < r["objective"] for r in train_lines)  # a sum over >1 token
    assert [r["step"] for r in eval_lines] == [4, 8]
    assert all({"accuracy", "rank_accuracy", "loss"} <= set(r) for r in eval_lines)
    prompt = np.load(model_dir / "prompts" / "8.npy")
    assert prompt.shape == (20, 64) and prompt.dtype == np.float32
    assert not (model_dir / "base_model").exists()  # the frozen weights are the bundled ones
    # Training moved the prompt, and best_prompt.npy is the prompt of the best eval's step.
    assert not np.allclose(np.load(model_dir / "prompts" / "4.npy"), prompt)
    best = json.loads((model_dir / "best.json").read_text())
    assert best["metric"] == "loss"  # demo.gin: early stopping on the validation loss
    losses = {r["step"]: r["loss"] for r in eval_lines}
    assert best["step"] == min(losses, key=losses.get) and best["value"] == min(losses.values())
    np.testing.assert_array_equal(np.load(model_dir / "best_prompt.npy"),
                                  np.load(model_dir / "prompts" / f"{best['step']}.npy"))


def test_eval_reproduces_each_steps_validation_metrics(demo_run, capsys):
    """`prompt-jax eval` on the prompt of step 4 and of step 8 gives that step's eval line:
    two different losses, each equal to the train job's."""
    model_dir, _ = demo_run
    evals = {r["step"]: r for r in read_metrics(model_dir) if r.get("split") == "validation"}
    assert evals[4]["loss"] != evals[8]["loss"]
    for step in (4, 8):
        prompt = model_dir / "prompts" / f"{step}.npy"
        out = job(capsys, "eval", f"--gin.MODEL_DIR='{model_dir}'",
                  f"--gin.PROMPT_FILE='{prompt}'", *DEMO)
        metrics = json.loads((model_dir / "eval_validation.json").read_text())["metrics"]
        np.testing.assert_allclose(metrics["loss"], evals[step]["loss"], rtol=1e-6)
        assert metrics["rank_accuracy"] == evals[step]["rank_accuracy"]
        assert metrics["accuracy"] == evals[step]["accuracy"]
        assert "accuracy=" in out


def test_eval_on_eight_devices_equals_one_device(demo_run):
    """Eval batches are sharded over the mesh's `data` axis: on 8 (simulated) devices the
    metrics are those the one-device train job logged."""
    model_dir, _ = demo_run
    final = [r for r in read_metrics(model_dir) if r.get("split") == "validation"][-1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = cli("eval", f"--gin.MODEL_DIR='{model_dir}'",
               f"--gin.PROMPT_FILE='{model_dir / 'prompts' / '8.npy'}'", *DEMO, env=env)
    assert "accuracy=" in proc.stdout
    metrics = json.loads((model_dir / "eval_validation.json").read_text())["metrics"]
    np.testing.assert_allclose(metrics["loss"], final["loss"], rtol=1e-5)
    assert metrics["rank_accuracy"] == final["rank_accuracy"]
    assert metrics["accuracy"] == final["accuracy"]


def _served(model_dir, prompt_file):
    """The demo's model and a prompt, in process, for reference decodes."""
    from prompt_jax import build

    served = build.load_served(build.ModelSpec(size="inhouse_tiny", dropout_rate=0.0),
                               str(build.demo_path("inhouse_tiny_t5")), str(model_dir),
                               [str(prompt_file)])
    return served


def _reference_decode(served, texts, beams=1):
    import jax.numpy as jnp

    from prompt_jax import decoding, tasks
    from prompt_jax.t5.model import T5

    vocab = tasks.get_vocabulary()
    rows = [list(vocab.encode(t)) + [1] for t in texts]  # infer reads inputs whole
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    prompt = jnp.asarray(next(iter(served.prompts.values())))
    model = T5(served.config)
    if beams > 1:
        out, scores = decoding.beam_search(model, served.frozen, jnp.asarray(tokens), 8, beams,
                                           0.6, prompt)
        out, scores = np.asarray(out)[:, 0], np.asarray(scores)[:, 0]
    else:
        out, scores = decoding.greedy_decode(model, served.frozen, jnp.asarray(tokens), 8,
                                             prompt)
    return [vocab.decode([int(t) for t in row if t > 1]) for row in np.asarray(out)], \
        np.asarray(scores)


@pytest.mark.parametrize("kind", ["jsonl", "tsv"])
def test_infer_input_file_equals_the_task_split_and_a_reference_decode(demo_run, tmp_path,
                                                                       kind, capsys):
    model_dir, _ = demo_run
    prompt = model_dir / "prompts" / "8.npy"
    split = tmp_path / "split.jsonl"
    job(capsys, "infer", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.PROMPT_FILE='{prompt}'",
        f"--gin.OUTPUT_FILE='{split}'", "--gin.infer.max_examples=6", *DEMO)
    from_split = [json.loads(line) for line in split.read_text().splitlines()]
    assert len(from_split) == 6 and all({"inputs", "prediction", "score", "targets"} <= set(r)
                                        for r in from_split)
    inputs = tmp_path / f"inputs.{kind}"
    if kind == "jsonl":
        inputs.write_text("".join(json.dumps({"inputs": r["inputs"]}) + "\n" for r in from_split))
    else:
        inputs.write_text("".join(r["inputs"].replace("\t", " ") + "\n" for r in from_split))
    out = tmp_path / "out.jsonl"
    job(capsys, "infer", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.PROMPT_FILE='{prompt}'",
        f"--gin.INPUT_FILE='{inputs}'", f"--gin.OUTPUT_FILE='{out}'", *DEMO)
    from_file = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prediction"] for r in from_file] == [r["prediction"] for r in from_split]
    np.testing.assert_allclose([r["score"] for r in from_file], [r["score"] for r in from_split],
                               rtol=1e-5, atol=1e-5)
    texts, scores = _reference_decode(_served(model_dir, prompt), [r["inputs"] for r in from_split])
    assert [r["prediction"] for r in from_file] == texts
    np.testing.assert_allclose([r["score"] for r in from_file], scores, rtol=1e-4, atol=1e-4)


def test_infer_prompts_by_task_and_beam_search(demo_run, tmp_path, capsys):
    """A mixed batch (rows of two 'tasks', each its own prompt) gives each row what its prompt
    gives alone; beam search in the job equals `decoding.beam_search`."""
    model_dir, _ = demo_run
    p4, p8 = model_dir / "prompts" / "4.npy", model_dir / "prompts" / "8.npy"
    texts = ["rte hypothesis: It rains. premise: The street is wet.",
             "rte hypothesis: A cat sat. premise: The dog barked at the mailman.",
             "rte hypothesis: Paris is in France. premise: France's capital is Paris."]
    inputs = tmp_path / "mixed.jsonl"
    inputs.write_text("".join(json.dumps({"inputs": t, "task": task}) + "\n"
                              for t in texts for task in ("four", "eight")))
    out = tmp_path / "mixed_out.jsonl"
    job(capsys, "infer", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INPUT_FILE='{inputs}'",
        f"--gin.OUTPUT_FILE='{out}'", f"--gin.infer.prompt_files_by_task={{'four': '{p4}', "
        f"'eight': '{p8}'}}", *DEMO)
    mixed = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["task"] for r in mixed] == ["four", "eight"] * 3
    for prompt, rows in ((p4, mixed[0::2]), (p8, mixed[1::2])):
        alone, scores = _reference_decode(_served(model_dir, prompt), texts)
        assert [r["prediction"] for r in rows] == alone
        np.testing.assert_allclose([r["score"] for r in rows], scores, rtol=1e-4, atol=1e-4)

    beam = tmp_path / "beam.jsonl"
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts))
    job(capsys, "infer", "--gin_file=demo_infer.gin", "--gin_file=decoding/beam.gin",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.PROMPT_FILE='{p8}'",
        f"--gin.INPUT_FILE='{plain}'", f"--gin.OUTPUT_FILE='{beam}'", *DEMO)
    rows = [json.loads(line) for line in beam.read_text().splitlines()]
    expected, scores = _reference_decode(_served(model_dir, p8), texts, beams=4)
    assert [r["prediction"] for r in rows] == expected
    np.testing.assert_allclose([r["score"] for r in rows], scores, rtol=1e-4, atol=1e-4)


def test_resume_after_kill_ends_with_the_uninterrupted_prompt(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda d: [sys.executable, "-m", "prompt_jax.cli",
                      *train_args(d, steps=12, period=4)]
    # The uninterrupted run goes on beside the one to be killed (two processes, no state
    # shared but the compilation cache); it is waited for before the resume.
    whole = subprocess.Popen(args(straight), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)

    # Kill the second run (SIGKILL: no chance to save) once its first checkpoint is
    # complete (checksums are written last; a step killed before them is rightly refused
    # on restart, and the run would start over).
    proc = subprocess.Popen(args(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while (not (resumed / "checkpoints" / "4" / "checksums.json").exists()
           and time.time() < deadline):
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "prompts" / "12.npy").exists()
    log, _ = whole.communicate(timeout=300)
    assert whole.returncode == 0, log

    done = cli(*train_args(resumed, steps=12, period=4))
    assert "resuming" in done.stdout
    np.testing.assert_array_equal(np.load(resumed / "prompts" / "12.npy"),
                                  np.load(straight / "prompts" / "12.npy"))
    steps = [r["step"] for r in read_metrics(resumed) if "split" not in r]
    assert steps == list(range(1, 13))  # lines the killed run logged past step 4 were redone


@pytest.mark.parametrize("bindings,missing", [
    ([], "INITIAL_CHECKPOINT, MIXTURE_OR_TASK_NAME, MODEL_DIR, PROMPT_LENGTH"),
    (["--gin.MODEL_DIR='/tmp/x'", "--gin.INITIAL_CHECKPOINT=None", "--gin.PROMPT_LENGTH=5"],
     "MIXTURE_OR_TASK_NAME"),
    (["--gin.MODEL_DIR='/tmp/x'", "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'",
      "--gin.PROMPT_LENGTH=5"], "INITIAL_CHECKPOINT"),
    (["--gin.INITIAL_CHECKPOINT=None", "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'",
      "--gin.PROMPT_LENGTH=5"], "MODEL_DIR"),
    (["--gin.MODEL_DIR='/tmp/x'", "--gin.INITIAL_CHECKPOINT=None",
      "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'"], "PROMPT_LENGTH"),
])
def test_missing_required_macro_is_named(bindings, missing, capsys):
    from prompt_jax import cli as cli_module

    rc = cli_module.main(["train", "--gin_file=runs/prompt_finetune.gin", *bindings])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"missing required macro{'s' if ',' in missing else ''} {missing}:" in err


def test_misspelt_macro_suggests_the_right_one(capsys):
    from prompt_jax import cli as cli_module

    assert cli_module.main(["train", "--gin.PROMPT_LENGHT=3"]) == 2
    assert "did you mean PROMPT_LENGTH?" in capsys.readouterr().err


def test_dry_run_reports_memory_for_a_mesh_this_machine_lacks(tmp_path, capsys):
    """T5 1.1 XXL prompt tuning on a 4x8 mesh with bf16 frozen weights: per-device figures
    (the hand calculation is in test_memory.py), nothing allocated, nothing written."""
    from prompt_jax import cli as cli_module

    rc = cli_module.main([
        "train", "--gin_file=models/t5_1_1_prompt.gin", "--gin_file=models/sizes/xxl.gin",
        "--gin_file=runs/prompt_finetune.gin", f"--gin.MODEL_DIR='{tmp_path / 'xxl'}'",
        "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'", "--gin.INITIAL_CHECKPOINT='unused'",
        "--gin.MESH_SHAPE=(4, 8)", "--gin.ModelSpec.param_dtype='bfloat16'",
        "--gin.ModelSpec.dtype='bfloat16'", "--dry_run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mesh (data=4, model=8), 32 devices" in out
    frozen = next(line for line in out.splitlines() if line.startswith("frozen parameters"))
    assert "11,135,332,352" in frozen and frozen.rstrip().endswith("2.59 GiB")
    assert not (tmp_path / "xxl").exists()


def testset_cpu_xla_flags_leave_a_users_choice_alone(monkeypatch):
    """The CLI turns XLA's CPU YNNPACK fusions off (faster here, bench/RESULTS.md) only when
    neither XLA_FLAGS nor PROMPT_JAX_CPU_YNN says otherwise, and only on jaxlib 0.10."""
    import importlib.metadata

    from prompt_jax import cli as prompt_jax_cli

    jaxlib = importlib.metadata.version("jaxlib")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("PROMPT_JAX_CPU_YNN", raising=False)
    prompt_jax_cli.set_cpu_xla_flags()
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_force_host_platform_device_count=2"
    assert flags[1:] == ([prompt_jax_cli.CPU_YNN_FLAG] if jaxlib.startswith("0.10.") else [])
    prompt_jax_cli.set_cpu_xla_flags()  # idempotent
    assert os.environ["XLA_FLAGS"].split() == flags
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    prompt_jax_cli.set_cpu_xla_flags()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("PROMPT_JAX_CPU_YNN", "1")
    prompt_jax_cli.set_cpu_xla_flags()
    assert os.environ["XLA_FLAGS"] == ""


def _dry_run_trainable(capsys, *gin_files: str) -> int:
    from prompt_jax import cli as cli_module

    rc = cli_module.main(["train", "--gin_file=demo.gin", *[f"--gin_file={f}" for f in gin_files],
                          "--gin.MODEL_DIR='/nonexistent/dry_run'", "--dry_run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    line = next(line for line in out.splitlines() if line.startswith("trainable parameters"))
    return int(line.split()[2].replace(",", ""))


def test_dry_run_counts_each_methods_parameters(capsys):
    """`--dry_run` with a method's gin file counts that method's trainable parameters:
    P-tuning's encoder as PEFT's PromptEncoder counts them, P-tuning v2's prefixes as
    length x layers x 2 x heads x d_kv, prompt tuning's P x E."""
    import gin

    from prompt_jax.t5.config import get_config

    config = get_config("inhouse_tiny")
    assert _dry_run_trainable(capsys) == 20 * config.d_model  # the demo's prompt
    gin.clear_config()
    assert _dry_run_trainable(capsys, "methods/p_tuning_v2.gin") == (
        20 * config.num_encoder_layers * 2 * config.num_heads * config.d_kv)
    gin.clear_config()
    pytest.importorskip("peft")
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning import model as peft_p_tuning

    encoder = peft_p_tuning.PromptEncoder(PromptEncoderConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=20, token_dim=config.d_model,
        num_transformer_submodules=1, num_attention_heads=4, num_layers=2,
        encoder_reparameterization_type="LSTM", encoder_hidden_size=config.d_model,
        encoder_num_layers=2))
    assert _dry_run_trainable(capsys, "methods/p_tuning.gin") == sum(
        p.numel() for p in encoder.parameters())


def test_export_hf_writes_the_t5s_own_trained_weights(tmp_path, capsys):
    """`train.export_hf` of a model-tuning + P-tuning v2 run: HF's T5 loads hf_export with
    no missing or unexpected weight (no method parameter in it), and its weights are the
    final checkpoint's trained T5 weights."""
    pytest.importorskip("torch")
    import orbax.checkpoint as ocp
    import transformers
    from conftest import run

    from prompt_jax.checkpoints import load_checkpoint
    from prompt_jax.pytree import flatten

    model_dir = tmp_path / "run"
    rc, _, err = run(capsys, "train", "--gin_file=demo.gin", "--gin_file=methods/p_tuning_v2.gin",
                     f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
                     "--gin.EVAL_PERIOD=2", "--gin.train.eval_split=None",
                     "--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
                     "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 8}",
                     "--gin.BATCH_SIZE=4", "--gin.TRAINABLE=['.*']",
                     "--gin.adafactor.learning_rate=0.01", "--gin.train.export_hf=True")
    assert rc == 0, err
    export = model_dir / "hf_export"
    hf, info = transformers.T5ForConditionalGeneration.from_pretrained(
        str(export), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, exported = load_checkpoint(str(export))
    state = ocp.StandardCheckpointer().restore(str(model_dir / "checkpoints" / "2" / "default"))
    trained = {k: np.asarray(v) for k, v in flatten(state["trainable"]).items()}
    assert any(k.startswith("deep_prompt/") for k in trained)
    exported = flatten(exported)
    assert set(exported) == {k for k in trained if not k.startswith("deep_prompt/")}
    for k, v in exported.items():
        np.testing.assert_array_equal(np.asarray(v), trained[k], err_msg=k)
    _, base = load_checkpoint(str(model_dir / "base_model"))
    assert any(np.abs(np.asarray(v) - trained[k]).max() > 0 for k, v in flatten(base).items())
