"""The reproduction scripts (scripts/): the shared helper quickly, and every script end to
end at CPU scale with 2 training steps (slow: `pytest -m slow tests/test_scripts.py`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from prompt_jax.t5.config import SIZES

SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import common  # noqa: E402  (scripts/ is not a package)

DEMO_DATA = REPO_ROOT / "prompt_jax" / "demo_data"
STAND_INS = REPO_ROOT / "tests" / "testdata" / "official"
PNG = b"\x89PNG\r\n\x1a\n"


def sweep_for(tmp_path, *extra: str) -> common.Sweep:
    return common.parse(common.parser("test"), [
        "--scale", "cpu", "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "--data_dir", str(DEMO_DATA), *extra])


# --------------------------------------------------------------------------- quick


def test_run_key_follows_the_settings(tmp_path):
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    sweep = sweep_for(tmp_path)
    job = sweep.tuning_job("inhouse_tiny", str(checkpoint), "super_glue_rte")
    key = job.key()
    assert key == sweep.tuning_job("inhouse_tiny", str(checkpoint), "super_glue_rte").key()
    assert sweep.run_dir(job).name.startswith("prompt-inhouse_tiny-rte-P100-class_labels-s0-")
    others = [sweep.tuning_job("inhouse_tiny", str(checkpoint), "super_glue_rte", prompt_length=5),
              sweep.tuning_job("inhouse_tiny", str(checkpoint), "super_glue_rte", seed=1),
              sweep.tuning_job("inhouse_tiny", str(checkpoint), "super_glue_rte",
                               init="sampled_vocab"),
              sweep_for(tmp_path, "--steps", "7").tuning_job("inhouse_tiny", str(checkpoint),
                                                             "super_glue_rte")]
    assert len({key} | {o.key() for o in others}) == 5
    (checkpoint / "config.json").write_text('{"rebuilt": 1}')  # same path, new weights
    assert job.key() != key


def test_commands_are_the_users_gin_configs(tmp_path):
    sweep = sweep_for(tmp_path, "--gin.train.eval_examples=8")
    argv = sweep.tuning_job("inhouse_tiny", "/m", "super_glue_rte", prompt_length=150,
                            init="random_uniform").argv("--gin.MODEL_DIR='/d'")
    assert argv[:5] == ["train", "--gin_file=models/t5_1_1_prompt.gin",
                        "--gin_file=models/sizes/inhouse_tiny.gin",
                        "--gin_file=prompts/random_uniform.gin",
                        "--gin_file=runs/prompt_finetune.gin"]
    assert "--gin.TASK_FEATURE_LENGTHS={'inputs': 278, 'targets': 8}" in argv
    assert "--gin.PROMPT_LENGTH=150" in argv and "--gin.train.eval_examples=8" in argv
    model = sweep.tuning_job("inhouse_tiny", "/m", "super_glue_rte", tuning="model").argv(None)
    assert "--gin_file=runs/model_finetune.gin" in model
    assert not any(a.startswith("--gin.PROMPT_LENGTH") for a in model)
    assert common.shell_arg("--gin.MODEL_DIR='/a b'") == "--gin.MODEL_DIR=\"'/a b'\""


def test_finished_runs_are_recognised(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not common.finished(run, 4)
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "split": "validation", "accuracy": 60.0,
                                        "loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert not common.finished(run, 4)  # no best.json yet
    (run / "best.json").write_text(json.dumps({"step": 4, "metric": "accuracy", "value": 60.0,
                                               "metrics": {"accuracy": 60.0, "loss": 0.5}}))
    assert common.finished(run, 4) and not common.finished(run, 5)
    assert common.final_eval(run) == {"accuracy": 60.0, "loss": 0.5}
    assert common.best(run)["value"] == 60.0


def test_scores():
    assert common.task_score({"f1": 80.0, "accuracy": 90.0, "loss": 3.0}) == 85.0
    assert common.aggregate({"super_glue_rte": {"accuracy": 60.0}}) == 60.0
    eight = {t: {"accuracy": 50.0} for t in common.SUPERGLUE}
    eight["super_glue_cb"] = {"mean_3class_f1": 70.0, "accuracy": 90.0}
    assert common.aggregate(eight) == pytest.approx((7 * 50.0 + 80.0) / 8)
    assert common.score_label(["super_glue_rte"], {"accuracy": 1}) == "RTE accuracy"
    assert common.score_label(common.SUPERGLUE) == "SuperGLUE score"
    assert common.fmt([50.0, 60.0]) == "55.0 ± 7.1" and common.fmt([]) == "—"


def test_tables_and_plots(tmp_path):
    md = common.write_markdown(tmp_path / "t.md", "Title", ["text"], [(["a", "b"], [[1, 2]])])
    assert md.read_text() == "# Title\n\ntext\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"
    params = {"inhouse_mini": 1_000_000, "inhouse_tiny": 2_650_000}
    many = {"Prompt": {"inhouse_mini": [50.0, 52.0], "inhouse_tiny": [55.0]},
            "Model": {"inhouse_mini": [51.0], "inhouse_tiny": [58.0, 60.0]}}
    one = {"P=1": {"inhouse_tiny": [50.0]}, "P=100": {"inhouse_tiny": [54.0, 56.0]}}
    paths = [common.plot_vs_size(tmp_path / "lines.png", "t", "y", many, params, 52.7),
             common.plot_vs_size(tmp_path / "bars.png", "t", "y", one, params),
             common.plot_vs_size(tmp_path / "none.png", "t", "y", {"a": {}}, params),
             common.plot_bars(tmp_path / "groups.png", "t", "y",
                              {"RTE": {"Average": 50.0, "Ensemble": 53.0}}),
             common.plot_message(tmp_path / "msg.png", "t", "not run: files missing")]
    for path in paths:
        assert path.read_bytes()[:8] == PNG, path


SCRIPT_NAMES = ["fig1_scale", "fig3a_prompt_length", "fig3b_prompt_init",
                "fig3c_pretraining_objective", "fig3d_lm_adaptation_steps",
                "table1_2_domain_shift", "table3_ensembling", "sec7_nearest_neighbours"]


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_paper_scale_plans_the_papers_runs(name, tmp_path, capsys):
    """--dry_run prints the commands without running them: the paper's settings."""
    module = __import__(name)
    module.main(["--scale", "paper", "--dry_run", "--work_dir", str(tmp_path)])
    commands = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("$ prompt-jax train")]
    assert commands
    for line in commands:
        for setting in ("--gin.TRAIN_STEPS=30000", "--gin.BATCH_SIZE=32",
                        "--gin.EVAL_PERIOD=1000", "--gin_file=models/t5_1_1_prompt.gin"):
            assert setting in line, (setting, line)
    assert not (tmp_path / "out").exists()
    if name in ("fig3a_prompt_length", "fig3b_prompt_init", "fig1_scale"):
        # every SuperGLUE task, every size, 3 seeds
        assert len(commands) % (8 * 5 * 3) == 0
        assert all(f"google/t5-{s}-lm-adapt" in " ".join(commands)
                   for s in ("small", "base", "large", "xl", "xxl"))
    if name == "fig3a_prompt_length":
        assert "--gin.PROMPT_LENGTH=150" in " ".join(commands)
        assert "{'inputs': 662, 'targets': 8}" in " ".join(commands)  # 512 text + 150
    if name == "fig3c_pretraining_objective":
        assert "super_glue_rte_sentinel" in " ".join(commands)
        assert "google/t5-v1_1-base" in " ".join(commands)


def test_a_paper_scale_command_is_valid_gin(tmp_path, capsys):
    """The planned command, as `prompt-jax train --dry_run` (parses the gin, reports memory)."""
    import fig3a_prompt_length

    fig3a_prompt_length.main(["--scale", "paper", "--dry_run", "--sizes", "base", "--tasks",
                              "super_glue_rte", "--seeds", "0", "--lengths", "100",
                              "--work_dir", str(tmp_path)])
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("$ prompt-jax train"))
    proc = subprocess.run(f"{sys.executable} -m prompt_jax.cli {line[len('$ prompt-jax '):]}"
                          " --dry_run", shell=True, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "t5_1_1_base" in proc.stdout or "GiB" in proc.stdout or "MiB" in proc.stdout


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cpu(tmp_path_factory):
    """Shared directories and flags: 2 steps, batch 4, 8 eval examples, the bundled RTE
    slice, and an in-house model pretrained for 2 steps per stage (built by the first
    script that needs it, reused by the others)."""
    root = tmp_path_factory.mktemp("reproduction")
    flags = ["--scale", "cpu", "--steps", "2", "--pretrain_steps", "2", "--batch_size", "4",
             "--work_dir", str(root / "work"), "--out", str(root / "out"),
             "--pretrain_root", str(root / "pretrain"),
             "--backbone", str(root / "pretrain" / "inhouse_tiny_t5"),
             "--gin.train.eval_examples=8", "--gin.infer.max_examples=8",
             "--gin.evaluate.eval_examples=8"]
    return root, flags


def run_script(cpu, name: str, *extra: str, data_dir=DEMO_DATA) -> tuple[str, str, str]:
    """Run a script; -> (stdout, table text, path of the PNG it wrote)."""
    root, flags = cpu
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *flags,
                           "--data_dir", str(data_dir), *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = root / "out" / f"{name}_cpu.md"
    plot = root / "out" / f"{name}_cpu.png"
    assert plot.read_bytes()[:8] == PNG
    return proc.stdout, table.read_text(), plot


@pytest.mark.slow
def test_fig3c_builds_the_inhouse_stages_and_compares_objectives(cpu):
    out, table, _ = run_script(cpu, "fig3c_pretraining_objective")
    assert "scripts/pretrain_tiny.py --size inhouse_tiny" in out
    root, _ = cpu
    for stage in ("span_corruption", "lm_adaptation"):
        assert (root / "pretrain" / "pretrain_tiny" / stage / "hf_export").is_dir()
    for row in ("| Span Corruption |", "| Span Corruption + Sentinel |", "| LM Adaptation |"):
        assert row in table
    assert "RTE accuracy" in table and "majority class" in table


@pytest.mark.slow
def test_fig3a_prompt_lengths(cpu):
    out, table, _ = run_script(cpu, "fig3a_prompt_length", "--lengths", "1,100,150")
    for length in (1, 100, 150):
        assert f"\n| {length} |" in table
    assert "{'inputs': 278, 'targets': 8}" in out  # P=150 fits: 128 text + 150
    assert "--gin.PromptInit.labels=\"('entailment',)\"" in out  # P=1: the first label


@pytest.mark.slow
def test_fig3b_prompt_inits_reuse_the_class_label_run(cpu):
    out, table, _ = run_script(cpu, "fig3b_prompt_init")
    for row in ("| Random Uniform |", "| Sampled Vocab |", "| Class Label |"):
        assert row in table
    assert out.count("$ prompt-jax train") == 2 and "reusing" in out  # P=100 from fig3a


@pytest.mark.slow
def test_fig3d_lm_adaptation_steps(cpu):
    out, table, _ = run_script(cpu, "fig3d_lm_adaptation_steps", "--lm_steps", "0,1,2")
    assert "lm_adaptation_1steps" in out  # a new stage; 0 and 2 are the recipe's
    for steps in (0, 1, 2):
        assert f"\n| {steps} |" in table


@pytest.mark.slow
def test_fig1_prompt_vs_model_tuning(cpu):
    out, table, _ = run_script(cpu, "fig1_scale", "--sizes", "inhouse_tiny")
    assert "--gin_file=runs/model_finetune.gin" in out
    assert "| Model Tuning |" in table and "| Prompt Tuning |" in table


@pytest.mark.slow
@pytest.mark.skipif("inhouse_mini" not in SIZES, reason="SIZES has no inhouse_mini yet")
def test_fig1_builds_each_inhouse_size(cpu):
    out, table, _ = run_script(cpu, "fig1_scale")  # default sizes: inhouse_mini, inhouse_tiny
    root, _ = cpu
    assert "scripts/pretrain_tiny.py --size inhouse_mini" in out
    assert (root / "pretrain" / "pretrain_inhouse_mini" / "model" / "REPORT.md").is_file()
    assert "inhouse_mini (1.1M)" in table and "Held-out span-corruption loss" in table


@pytest.mark.slow
def test_table3_ensembling(cpu):
    out, table, _ = run_script(cpu, "table3_ensembling", "--num_prompts", "3")
    assert "$ prompt-jax infer" in out and "best_prompt.npy" in out
    assert "| Task | Metric | Average | Best | Ensemble |" in table
    assert "| RTE | accuracy |" in table


@pytest.mark.slow
def test_sec7_nearest_neighbours_reuses_its_run(cpu):
    out, table, _ = run_script(cpu, "sec7_nearest_neighbours")
    assert "$ prompt-jax train" not in out and "reusing" in out
    assert "neighbour 5" in table and "entailment" in table


@pytest.mark.slow
def test_tables1_2_say_what_is_missing_and_run_on_the_official_format(cpu):
    _, table, _ = run_script(cpu, "table1_2_domain_shift")  # the demo data has no GLUE
    assert "not run" in table and "glue/QQP" in table and "SQuAD" in table
    out, table, _ = run_script(cpu, "table1_2_domain_shift", "--vocab",
                               str(DEMO_DATA / "spiece.model"), data_dir=STAND_INS)
    assert "$ prompt-jax eval" in out
    for row in ("| QQP | MRPC | out-of-domain | Prompt |",
                "| MRPC | QQP | out-of-domain | Model |", "| QQP | QQP | in-domain | Model |"):
        assert row in table
