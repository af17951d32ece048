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

# Small and fast: the demo config on a random 2+2-layer T5, short inputs, dropout off.
FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=4", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_examples=24", "--gin.evaluate.eval_examples=24"]
# The README's demo command, as it is, with fewer steps and a smaller eval set.
DEMO = ["--gin.train.eval_examples=24", "--gin.evaluate.eval_examples=24"]


def cli(*args: str, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prompt-jax {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(model_dir) -> list[dict]:
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_args(model_dir, steps=8, period=4, settings=FAST):
    return ["train", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.EVAL_PERIOD={period}", "--gin.train.log_period=1", *settings]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's demo command (bundled backbone and data), with a small step count."""
    model_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = cli(*train_args(model_dir, settings=DEMO))
    return model_dir, proc


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
    assert all(np.isfinite(r["loss"]) for r in train_lines)
    assert [r["step"] for r in eval_lines] == [4, 8]
    assert all({"accuracy", "rank_accuracy", "loss"} <= set(r) for r in eval_lines)
    prompt = np.load(model_dir / "prompts" / "8.npy")
    assert prompt.shape == (20, 64) and prompt.dtype == np.float32
    assert not (model_dir / "base_model").exists()  # the frozen weights are the bundled ones


def test_eval_and_infer_reproduce_the_final_validation_metrics(demo_run):
    model_dir, _ = demo_run
    final = [r for r in read_metrics(model_dir) if r.get("split") == "validation"][-1]
    prompt = model_dir / "prompts" / "8.npy"
    proc = cli("eval", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.PROMPT_FILE='{prompt}'", *DEMO)
    with open(model_dir / "eval_validation.json") as f:
        metrics = json.load(f)["metrics"]
    assert metrics["accuracy"] == final["accuracy"]
    assert metrics["rank_accuracy"] == final["rank_accuracy"]
    np.testing.assert_allclose(metrics["loss"], final["loss"], rtol=1e-6)
    assert "accuracy=" in proc.stdout

    out = model_dir / "infer.jsonl"
    proc = cli("infer", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.PROMPT_FILE='{prompt}'",
               f"--gin.OUTPUT_FILE='{out}'", "--gin.infer.max_examples=24", *DEMO)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and all({"inputs", "prediction", "score"} <= set(r) for r in rows)
    assert f"accuracy={final['accuracy']:.4g}" in proc.stdout


def test_resume_after_kill_ends_with_the_uninterrupted_prompt(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = lambda d: [sys.executable, "-m", "prompt_jax.cli",
                      *train_args(d, steps=12, period=4)]
    subprocess.run(args(straight), check=True, capture_output=True, timeout=300)

    # Kill the second run (SIGKILL: no chance to save) once its first checkpoint exists.
    proc = subprocess.Popen(args(resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (resumed / "checkpoints" / "4").exists() and time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("the run ended before it could be interrupted")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "prompts" / "12.npy").exists()

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
    assert rc == 2
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
