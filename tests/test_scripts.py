"""The reproduction scripts (scripts/): the shared modules quickly, and every script end to
end at CPU scale with 2 training steps (slow: `pytest -m slow tests/test_scripts.py`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from prompt_jax.model_dir import final_eval, finished, read_best
from prompt_jax.t5.config import SIZES

SCRIPTS = REPO_ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

# scripts/ is not a package
import report  # noqa: E402
from jobs import shell_arg, short_path  # noqa: E402
from scores import SUPERGLUE, aggregate, fmt, param_count, score_label, task_score  # noqa: E402
from sweep import Results, Sweep, parse, parser  # noqa: E402

DEMO_DATA = REPO_ROOT / "prompt_jax" / "demo_data"
STAND_INS = REPO_ROOT / "tests" / "testdata" / "official"


def sweep_for(tmp_path, *extra: str) -> Sweep:
    return parse(parser("test"), [
        "--scale", "cpu", "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
        "--data_dir", str(DEMO_DATA), *extra])


def image(path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The PNG at `path`, decoded [H, W, 4]; checked to be `size` (width, height) pixels."""
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert size is None or pixels.shape[:2] == (size[1], size[0]), (path, pixels.shape)
    return pixels


def drawn_on(pixels: np.ndarray) -> float:
    """The fraction of pixels that are not white."""
    return float((pixels[..., :3] < 0.95).any(axis=-1).mean())


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
    deep = sweep.tuning_job("inhouse_tiny", "/m", "super_glue_rte",
                            tuning="p_tuning_v2_head").argv(None)
    assert deep[3:5] == ["--gin_file=runs/prompt_finetune.gin",  # the method's file last
                         "--gin_file=methods/p_tuning_v2_head.gin"]
    assert "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 8}" in deep  # no prompt
    assert not any(a.startswith("--gin.PROMPT_LENGTH") for a in deep)
    with pytest.raises(ValueError, match="tuning='p_tuning'"):
        sweep.tuning_job("inhouse_tiny", "/m", "super_glue_rte", tuning="p_tuning")
    assert shell_arg("--gin.MODEL_DIR='/a b'") == "--gin.MODEL_DIR=\"'/a b'\""
    assert short_path(f"--gin.MODEL_DIR='{REPO_ROOT}/runs/a'") == "--gin.MODEL_DIR='runs/a'"
    assert short_path(REPO_ROOT.parent / "shared") == "../shared"
    elsewhere = f"/tmp/x{REPO_ROOT.parent}/y"  # holds the repository's parent, not under it
    assert short_path(elsewhere) == elsewhere
    # --gin. arguments reach every command as given, whatever their values hold
    given = ["--gin.MESH_SHAPE=(-1, 8)", "--gin.infer.note='a = b'"]
    assert sweep_for(tmp_path, *given).extra == tuple(given)
    with pytest.raises(SystemExit):
        sweep_for(tmp_path, "--gin.MESH_SHAPE")


def test_finished_runs_are_recognised(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert not finished(run, 4)
    lines = [{"step": 2, "loss": 1.0}, {"step": 4, "split": "validation", "accuracy": 60.0,
                                        "loss": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert not finished(run, 4)  # no best.json yet
    (run / "best.json").write_text(json.dumps({"step": 4, "metric": "accuracy", "value": 60.0,
                                               "metrics": {"accuracy": 60.0, "loss": 0.5}}))
    assert finished(run, 4) and not finished(run, 5)
    assert final_eval(run) == {"accuracy": 60.0, "loss": 0.5}
    assert read_best(run)["value"] == 60.0
    # A sweep reuses such a run: no command.
    sweep = sweep_for(tmp_path, "--steps", "4")
    job = sweep.tuning_job("inhouse_tiny", "/m", "super_glue_rte")
    sweep.run_dir(job).parent.mkdir(parents=True)
    run.rename(sweep.run_dir(job))
    assert sweep.train(job) == sweep.run_dir(job)
    assert capsys.readouterr().out.startswith("reusing ")


def test_scores():
    from prompt_jax.tasks.metrics import SUPERGLUE_SCORED_TASKS

    assert SUPERGLUE == tuple(f"super_glue_{t}" for t in SUPERGLUE_SCORED_TASKS)
    assert task_score({"f1": 80.0, "accuracy": 90.0, "loss": 3.0}) == 85.0
    assert aggregate({"super_glue_rte": {"accuracy": 60.0}}) == 60.0
    eight = {t: {"accuracy": 50.0} for t in SUPERGLUE}
    eight["super_glue_cb"] = {"mean_3class_f1": 70.0, "accuracy": 90.0}
    assert aggregate(eight) == pytest.approx((7 * 50.0 + 80.0) / 8)
    assert score_label(["super_glue_rte"], {"accuracy": 1}) == "RTE accuracy"
    assert score_label(SUPERGLUE) == "SuperGLUE score"
    assert fmt([50.0, 60.0]) == "55.0 ± 7.1" and fmt([]) == "—"


def cells(table: str, *first: str) -> list[str]:
    """The cells after `first` of the first markdown row that starts with them."""
    start = "| " + " | ".join(first) + " |"
    row = next(line for line in table.splitlines() if line.startswith(start))
    return [c.strip() for c in row.strip("|").split("|")][len(first):]


def test_tables_and_plots(tmp_path, monkeypatch):
    md = report.write_markdown(tmp_path / "t.md", "Title", ["text"], [(["a", "b"], [[1, 2]])])
    assert md.read_text() == "# Title\n\ntext\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n"

    # A sweep's table and plot show the same numbers.
    sweep = sweep_for(tmp_path, "--sizes", "inhouse_mini,inhouse_tiny")
    monkeypatch.setattr(sweep, "majority_baseline", lambda: 52.7)
    rte = "super_glue_rte"
    results = Results(
        series={"Prompt": {"inhouse_mini": [50.0, 52.0], "inhouse_tiny": [55.0]},
                "Model": {"inhouse_mini": [51.0]}},  # as run_variants: none where missing
        by_task={}, dirs={"a": tmp_path / "run"}, missing={("Model", "inhouse_tiny"): "why"},
        metric_names={rte: ["accuracy"]},
        diagnostics={("Prompt", "inhouse_mini", rte): [{"rank_accuracy": 60.0, "loss": 0.7},
                                                       {"rank_accuracy": 62.0, "loss": 0.6}],
                     ("Prompt", "inhouse_tiny", rte): [{"rank_accuracy": 64.0, "loss": 0.5}]})
    table, plot = report.write_sweep(sweep, results, "stem", "Title", "variant", ["text"])
    text = table.read_text()
    assert table.name == "stem_cpu.md" and plot.path.name == "stem_cpu.png"
    assert cells(text, "Prompt") == ["51.0 ± 1.4", "55.0"]
    assert cells(text, "Model") == ["51.0", "not run: why"]
    x = {s: float(param_count(s)) for s in sweep.sizes}
    scores = plot.drawn["RTE accuracy"]
    for label in ("Prompt", "Model"):  # every number of the table, and nothing else
        expected = [(x[s], float(c.split(" ± ")[0]))
                    for s, c in zip(sweep.sizes, cells(text, label), strict=True)
                    if not c.startswith("not run")]
        assert [(px, round(py, 1)) for px, py in scores[label]] == expected, label
    assert {y for _, y in scores["majority class (52.7)"]} == {52.7}
    losses = plot.drawn["validation loss per token (lower is better)"]
    assert [(px, round(py, 3)) for px, py in losses["Prompt"]] == [
        (x[s], float(cells(text, "Prompt", s, rte)[1].split(" ± ")[0])) for s in sweep.sizes]
    assert drawn_on(image(plot.path, (1320, 480))) > 0.02  # two panels of 5.5 x 4 in, 120 dpi

    # One size: a bar per series; grouped bars; nothing to plot.
    params = {"inhouse_mini": 1_000_000, "inhouse_tiny": 2_650_000}
    one = {"P=1": {"inhouse_tiny": [50.0]}, "P=100": {"inhouse_tiny": [54.0, 56.0]}}
    bars = report.plot_vs_size(tmp_path / "bars.png", "t", "y", one, params)
    assert bars.drawn == {"y": {"P=1": [(0.0, 50.0)], "P=100": [(1.0, 55.0)]}}
    groups = report.plot_bars(tmp_path / "groups.png", "t", "y",
                              {"RTE": {"Average": 50.0, "Ensemble": 53.0}})
    assert {k: [y for _, y in v] for k, v in groups.drawn["y"].items()} == {
        "Average": [50.0], "Ensemble": [53.0]}
    empty = report.plot_vs_size(tmp_path / "none.png", "t", "y", {"a": {}}, params)
    message = report.plot_message(tmp_path / "msg.png", "t", "not run: files missing")
    assert empty.drawn == message.drawn == {"": {}}
    for plot, size in ((bars, (660, 480)), (groups, (540, 480)), (empty, (720, 300)),
                       (message, (720, 300))):
        assert drawn_on(image(plot.path, size)) > 0.002, plot.path
    # control: a blank figure fails the check
    blank = report.save_figure(report.pyplot().figure(figsize=(2, 1)), tmp_path / "blank.png")
    assert drawn_on(image(blank.path, (240, 120))) == 0.0


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


def cpu_run(root, pretrain) -> tuple:
    """Directories and flags of the end-to-end runs: 2 steps, batch 4, 8 eval examples, the
    bundled RTE slice, and in-house models pretrained for 2 steps per stage under
    `pretrain` (built by the first script that needs them)."""
    flags = ["--scale", "cpu", "--steps", "2", "--pretrain_steps", "2", "--batch_size", "4",
             "--work_dir", str(root / "work"), "--out", str(root / "out"),
             "--pretrain_root", str(pretrain), "--backbone", str(pretrain / "inhouse_tiny_t5"),
             "--gin.train.eval_examples=8", "--gin.infer.max_examples=8",
             "--gin.evaluate.eval_examples=8"]
    return root, pretrain, flags


@pytest.fixture(scope="module")
def shared_pretrain(tmp_path_factory):
    """The in-house models the end-to-end tests share (what they check does not depend on
    which test built them)."""
    return tmp_path_factory.mktemp("pretrain")


@pytest.fixture
def cpu(tmp_path, shared_pretrain):
    """This test's own run and output directories, on the shared in-house models."""
    return cpu_run(tmp_path, shared_pretrain)


@pytest.fixture
def cpu_unbuilt(tmp_path):
    """This test's own directories and in-house models (none built yet)."""
    return cpu_run(tmp_path, tmp_path / "pretrain")


def run_script(cpu, name: str, *extra: str, data_dir=DEMO_DATA) -> tuple[str, str, str]:
    """Run a script; -> (stdout, table text, path of the PNG it wrote)."""
    root, _, flags = cpu
    proc = subprocess.run([sys.executable, str(SCRIPTS / f"{name}.py"), *flags,
                           "--data_dir", str(data_dir), *extra],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = root / "out" / f"{name}_cpu.md"
    plot = root / "out" / f"{name}_cpu.png"
    assert drawn_on(image(plot)) > 0.002
    return proc.stdout, table.read_text(), plot


@pytest.mark.slow
def test_fig3c_builds_the_inhouse_stages_and_compares_objectives(cpu_unbuilt):
    out, table, _ = run_script(cpu_unbuilt, "fig3c_pretraining_objective")
    assert "scripts/pretrain_tiny.py --size inhouse_tiny" in out
    _, pretrain, _ = cpu_unbuilt
    for stage in ("span_corruption", "lm_adaptation"):
        assert (pretrain / "pretrain_tiny" / stage / "hf_export").is_dir()
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
    run_script(cpu, "fig3a_prompt_length", "--lengths", "100")  # P=100, class-label init
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
    _, pretrain, _ = cpu
    assert "scripts/pretrain_tiny.py --size inhouse_mini" in out  # no other test builds it
    report = (pretrain / "pretrain_inhouse_mini" / "model" / "REPORT.md").read_text()
    assert "Does the decoder read its encoder?" in report and "| random (same shape) |" in report
    assert "inhouse_mini (1.1M)" in table
    assert "Held-out span-corruption / LM-adaptation loss" in table
    losses = r"inhouse_mini \d+\.\d{3} / \d+\.\d{3} \(inputs/targets 128/32, 128/64\)"
    assert re.search(losses, table)


@pytest.mark.slow
def test_table3_ensembling(cpu):
    out, table, _ = run_script(cpu, "table3_ensembling", "--num_prompts", "3")
    assert "$ prompt-jax infer" in out and "best_prompt.npy" in out
    assert "| Task | Metric | Average | Best | Ensemble |" in table
    assert "| RTE | accuracy |" in table


@pytest.mark.slow
def test_sec7_nearest_neighbours_reuses_its_run(cpu):
    run_script(cpu, "fig3a_prompt_length", "--lengths", "100")  # the default run
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
