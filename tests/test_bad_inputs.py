"""Every bad input gets a one-line error naming the thing and what was expected, a non-zero
exit, no traceback unless --verbose, and leaves what was already written intact.

Each case calls the CLI as a user would (`prompt_jax.cli.main`, or a subprocess where a
signal or a device count is involved).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO_ROOT, assert_one_line_error, run, shared_file, snapshot

from prompt_jax import cli

# The demo's config, made small and fast: a random 2+2-layer T5 instead of the bundled
# backbone, short inputs, small batches.
FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=4", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_examples=8", "--gin.evaluate.eval_examples=8"]
E = 64  # d_model of the tiny T5


def train_args(model_dir, steps=4, period=2, *extra):
    return ["train", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.EVAL_PERIOD={period}", *FAST, *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step demo run (checkpoints at 2 and 4), never modified by the tests."""
    model_dir = tmp_path_factory.mktemp("bad_inputs") / "run"
    assert cli.main(train_args(model_dir)) == 0
    return model_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def prompt_file(tmp_path, array, name="prompt.npy", allow_pickle=False):
    path = tmp_path / name
    np.save(path, array, allow_pickle=allow_pickle)
    return path


# ------------------------------------------------------------------------ prompt files

@pytest.mark.parametrize("array,patterns", [
    (np.zeros((4, 32), np.float32), [r"bad\.npy: prompt has shape \(4, 32\), expected \[P, 64\]"]),
    (np.zeros((4, E), np.int64), [r"bad\.npy: prompt has dtype int64, expected a float"]),
    (np.full((4, E), np.nan, np.float32), [r"bad\.npy: prompt holds 256 NaN/inf values"]),
])
def test_bad_prompt_file_in_eval(finished_run, tmp_path, capsys, array, patterns):
    before = snapshot(finished_run)
    path = prompt_file(tmp_path, array, "bad.npy")
    rc, _, err = run(capsys, "eval", f"--gin.MODEL_DIR='{finished_run}'",
                     f"--gin.PROMPT_FILE='{path}'", *FAST)
    assert_one_line_error(rc, err, *patterns)
    assert snapshot(finished_run) == before


def test_pickled_prompt_is_refused(tmp_path, capsys):
    path = prompt_file(tmp_path, np.array([{"x": 1}] * 4, dtype=object), "evil.npy",
                       allow_pickle=True)
    rc, _, err = run(capsys, "infer", str(path), f"--gin.MODEL_DIR='{tmp_path / 'out'}'",
                     "--gin.INITIAL_CHECKPOINT=None", *FAST)
    assert_one_line_error(rc, err, r"evil\.npy: holds a pickled \(object\) array",
                          "never unpickles")


def test_prompt_file_of_wrong_length_in_train(tmp_path, capsys):
    path = prompt_file(tmp_path, np.zeros((7, E), np.float32), "p7.npy")
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), "--gin_file=demo.gin",
                     "--gin_file=prompts/from_file.gin",
                     f"--gin.PROMPT_FILE='{path}'")
    assert_one_line_error(rc, err, r"p7\.npy: prompt has shape \(7, 64\), expected \(4, 64\)")


# ------------------------------------------------------------------------ checkpoints

def test_checkpoint_path_that_does_not_exist(tmp_path, capsys):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"),
                     f"--gin.INITIAL_CHECKPOINT='{tmp_path / 'nowhere'}'")
    assert_one_line_error(rc, err, r"nowhere: checkpoint path does not exist")


def test_checkpoint_of_another_architecture(tmp_path, capsys):
    t5x = shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), f"--gin.INITIAL_CHECKPOINT='{t5x}'")
    # INITIAL_CHECKPOINT determines the architecture; the size gin names what differs.
    assert_one_line_error(rc, err, r"checkpoint_3: the checkpoint has d_model=4, but "
                                   r"ModelSpec.size='tiny' has d_model=64")


def test_truncated_zarr_chunk(tmp_path, capsys):
    src = shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3")
    ckpt = tmp_path / "checkpoint_3"
    shutil.copytree(src, ckpt)
    chunk = ckpt / "target.decoder.logits_dense.kernel" / "0.3"
    chunk.chmod(0o644)
    chunk.write_bytes(chunk.read_bytes()[:100])
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), f"--gin.INITIAL_CHECKPOINT='{ckpt}'")
    assert_one_line_error(rc, err, r"target\.decoder\.logits_dense\.kernel: cannot read "
                                   r"parameter decoder/logits_dense/kernel")


def test_pytorch_bin_only_directory(tmp_path, capsys):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "t5", "vocab_size": 32128,
                                                "d_model": 64, "d_kv": 16, "d_ff": 128,
                                                "num_heads": 4, "num_layers": 2,
                                                "feed_forward_proj": "gated-gelu"}))
    (hf / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), f"--gin.INITIAL_CHECKPOINT='{hf}'")
    assert_one_line_error(rc, err, r"pytorch_model\.bin.*refuses", "save_pretrained")


def test_half_written_orbax_checkpoint_falls_back(run_copy, capsys):
    """A save cut short leaves orbax's temporary directory; a damaged final step is skipped.
    Either way the run resumes from the previous good checkpoint and says so."""
    ckpts = run_copy / "checkpoints"
    shutil.copytree(ckpts / "4", ckpts / "6.orbax-checkpoint-tmp-1234")  # an interrupted save
    for f in (ckpts / "4").rglob("*"):  # and a damaged latest step
        if f.is_file() and f.stat().st_size > 0 and "manifest" in f.name:
            f.write_bytes(b"")
    damaged = [f for f in (ckpts / "4").rglob("*") if f.is_file() and f.stat().st_size == 0]
    if not damaged:  # orbax layout without a manifest: empty every data file instead
        for f in (ckpts / "4").rglob("*"):
            if f.is_file():
                f.write_bytes(b"")
    prompt_2 = (run_copy / "prompts" / "2.npy").read_bytes()
    rc, out, err = run(capsys, *train_args(run_copy))
    assert rc == 0, err
    assert "falling back" in out + err and "resuming" in out and "from step 2" in out
    assert (run_copy / "prompts" / "2.npy").read_bytes() == prompt_2
    assert (run_copy / "prompts" / "4.npy").exists()


def test_model_dir_with_a_different_config_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    rc, _, err = run(capsys, *train_args(run_copy, 4, 2, "--gin.adafactor.learning_rate=0.1"))
    assert_one_line_error(rc, err, "holds a run with a different config", "--overwrite")
    assert snapshot(run_copy) == before
    rc, _, err = run(capsys, *train_args(run_copy, 4, 2, "--gin.adafactor.learning_rate=0.1"),
                     "--overwrite")
    assert rc == 0, err


def test_run_of_an_older_prompt_jax_is_refused(run_copy, capsys):
    """A config.gin without the v2 header was written when TASK_FEATURE_LENGTHS['inputs']
    counted the prompt: resuming it now would silently feed it longer text."""
    config = run_copy / "config.gin"
    config.write_text("\n".join(config.read_text().splitlines()[1:]) + "\n")
    before = snapshot(run_copy)
    rc, _, err = run(capsys, *train_args(run_copy, 6, 2))
    assert_one_line_error(rc, err, r"made by an older prompt_jax", r"counted the prompt",
                          r"--overwrite")
    assert snapshot(run_copy) == before


# ------------------------------------------------------------------------ vocab, tasks, gin

def test_missing_vocab_file(tmp_path, capsys):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"),
                     f"--gin.prompt_jax.tasks.data_paths.vocab='{tmp_path / 'spm.model'}'")
    assert_one_line_error(rc, err, r"spm\.model: no SentencePiece model there")


def test_vocab_file_that_is_not_sentencepiece(tmp_path, capsys):
    junk = tmp_path / "vocab.model"
    junk.write_text("not a model\n")
    rc, _, err = run(capsys, *train_args(tmp_path / "run"),
                     f"--gin.prompt_jax.tasks.data_paths.vocab='{junk}'")
    assert_one_line_error(rc, err, r"vocab\.model: not a SentencePiece model")


def test_unknown_task_name_with_close_matches(tmp_path, capsys):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"),
                     "--gin.MIXTURE_OR_TASK_NAME='super_glue_rtee'")
    assert_one_line_error(rc, err, r"'super_glue_rtee' is not a registered task",
                          r"did you mean super_glue_rte")


def test_gin_file_with_a_misspelt_configurable(tmp_path, capsys):
    gin_file = tmp_path / "mine.gin"
    gin_file.write_text("include 'demo.gin'\ntrian.batch_size = 3\n")
    rc, _, err = run(capsys, "train", f"--gin_file={gin_file}")
    assert rc == 2
    assert_one_line_error(rc, err, r"No configurable matching 'trian'", r"mine\.gin")


def test_missing_required_macro(capsys):
    rc, _, err = run(capsys, "eval", "--gin_file=runs/prompt_eval.gin")
    assert rc == 2
    assert_one_line_error(rc, err, "missing required macros INITIAL_CHECKPOINT, "
                                   "MIXTURE_OR_TASK_NAME")


# ------------------------------------------------------------------------ data files

def rte_dir(tmp_path, splits=("train", "val"), edit=None):
    """A data dir with (a copy of) the bundled RTE slice; `edit(split, lines) -> lines`."""
    src = REPO_ROOT / "prompt_jax" / "demo_data" / "super_glue" / "RTE"
    dst = tmp_path / "data" / "super_glue" / "RTE"
    dst.mkdir(parents=True)
    for split in splits:
        lines = (src / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (dst / f"{split}.jsonl").write_text("".join(edit(split, lines) if edit else lines))
    return tmp_path / "data"


def data_arg(data_dir):
    return f"--gin.prompt_jax.tasks.data_paths.data_dir='{data_dir}'"


RTE = "--gin.MIXTURE_OR_TASK_NAME='super_glue_rte'"  # the task of `rte_dir` (the demo's is SST-2)


def test_data_directory_missing_a_split(tmp_path, capsys):
    data = rte_dir(tmp_path, splits=("train",))
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), data_arg(data), RTE)
    assert_one_line_error(rc, err, r"RTE/val\.jsonl: no such file",
                          r"super_glue/RTE/\{train,val,test\}\.jsonl")


def test_malformed_jsonl_line(tmp_path, capsys):
    data = rte_dir(tmp_path, edit=lambda s, lines: lines[:2] + ["{not json\n"] + lines[3:])
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), data_arg(data), RTE)
    assert_one_line_error(rc, err, r"RTE/(train|val)\.jsonl:3: ")


def test_malformed_tsv_line(tmp_path, capsys):
    src = REPO_ROOT / "tests" / "testdata" / "official" / "glue" / "MRPC"
    if not src.is_dir():
        pytest.skip(f"{src} is absent")
    dst = tmp_path / "data" / "glue" / "MRPC"
    shutil.copytree(src, dst)
    lines = (dst / "train.tsv").read_text().splitlines(keepends=True)
    (dst / "train.tsv").write_text("".join(lines[:2] + ["only\ttwo columns\n"] + lines[2:]))
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), data_arg(tmp_path / "data"),
                     "--gin.MIXTURE_OR_TASK_NAME='glue_mrpc'")
    assert_one_line_error(rc, err, r"MRPC/train\.tsv:3: ")


def test_empty_split(tmp_path, capsys):
    data = rte_dir(tmp_path, edit=lambda s, lines: [] if s == "train" else lines)
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), data_arg(data), RTE)
    assert_one_line_error(rc, err, r"RTE/train\.jsonl: the train split of rte "
                                   r"holds no example")


def test_long_inputs_are_truncated_and_reported_once(tmp_path, capsys):
    rc, out, err = run(capsys, *train_args(tmp_path / "run", 2, 2), "--gin.train.eval_split=None")
    assert rc == 0, err
    # TASK_FEATURE_LENGTHS['inputs'] = 48 is the text's budget (the 4 prompt positions
    # come on top).
    reports = [line for line in out.splitlines() if "inputs truncated to 48 tokens" in line]
    assert len(reports) == 1 and re.match(r"train: \d+ of 8000 inputs truncated", reports[0])


# ------------------------------------------------------------------------ run settings

@pytest.mark.parametrize("length,pattern", [
    (0, r"PROMPT_LENGTH=0 leaves nothing to train"),
    (-3, r"PROMPT_LENGTH must be a non-negative integer, got -3"),
])
def test_bad_prompt_length(tmp_path, capsys, length, pattern):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), f"--gin.PROMPT_LENGTH={length}")
    assert_one_line_error(rc, err, pattern)


@pytest.mark.parametrize("lengths,pattern", [
    ("{'inputs': 0, 'targets': 8}", r"TASK_FEATURE_LENGTHS\['inputs'\] must be a positive "
                                    r"integer, got 0"),
    ("{'inputs': 48}", r"TASK_FEATURE_LENGTHS must be a dict with keys 'inputs' and 'targets'"),
])
def test_bad_feature_lengths(tmp_path, capsys, lengths, pattern):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), f"--gin.TASK_FEATURE_LENGTHS={lengths}")
    assert_one_line_error(rc, err, pattern)
    assert not (tmp_path / "run").exists()


def test_model_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    rc, _, err = run(capsys, *train_args(tmp_path / "run"))
    assert_one_line_error(rc, err, r"MODEL_DIR=.*run' is a file, not a directory")
    assert (tmp_path / "run").read_text() == "not a directory"


def test_mesh_larger_than_the_devices(tmp_path, capsys):
    rc, _, err = run(capsys, *train_args(tmp_path / "run"), "--gin.MESH_SHAPE=(4, 1)")
    assert_one_line_error(rc, err, r"mesh \(4, 1\) needs 4 devices, 1 available")


def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli",
                           *train_args(tmp_path / "run"), "--gin.BATCH_SIZE=3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr,
                          r"BATCH_SIZE=3 is not divisible by the data-parallel size 2")


# ------------------------------------------------------------------------ during training

def test_disk_full_while_saving_damages_nothing(run_copy, capsys, monkeypatch):
    """The 6th step's prompt file cannot be written; what was saved before is intact."""
    before = snapshot(run_copy / "prompts")
    real_save = np.save

    def full_disk(file, arr, *args, **kwargs):
        if hasattr(file, "write"):
            file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from prompt_jax import prompts

    monkeypatch.setattr(prompts.np, "save", full_disk)
    rc, _, err = run(capsys, *train_args(run_copy, 6, 2))
    monkeypatch.setattr(prompts.np, "save", real_save)
    assert_one_line_error(rc, err, "No space left on device")
    assert snapshot(run_copy / "prompts") == before  # no partial 6.npy, no stray temp file
    np.load(run_copy / "prompts" / "4.npy")
    np.load(run_copy / "best_prompt.npy")


def test_sigterm_saves_then_exits_cleanly(tmp_path):
    model_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "prompt_jax.cli",
                             *train_args(model_dir, 400, 400), "--gin.train.log_period=1",
                             "--gin.train.eval_split=None"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = model_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    saved = sorted(int(d.name) for d in (model_dir / "checkpoints").iterdir() if d.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 400
    assert f"received SIGTERM: saved step {saved[0]}" in err
    assert (model_dir / "prompts" / f"{saved[0]}.npy").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """From the third update on, the learning rate grows by 1e19 per step until float32
    overflows: the prompt becomes inf/NaN after some good (saved) steps."""
    model_dir = tmp_path / "run"
    rc, _, err = run(capsys, *train_args(model_dir, 8, 1), "--gin.train.eval_split=None",
                     "--gin.adafactor.learning_rate=@piecewise_constant_schedule()",
                     "--gin.piecewise_constant_schedule.init_value=0.3",
                     "--gin.piecewise_constant_schedule.boundaries_and_scales="
                     "{2: 1e19, 3: 1e19, 4: 1e19}")
    assert_one_line_error(rc, err, r"step \d: (loss is nan|parameters hold NaN/inf)",
                          r"last good checkpoint is step \d")
    bad = int(re.search(r"step (\d):", err).group(1))
    good = int(re.search(r"last good checkpoint is step (\d)", err).group(1))
    assert 2 <= good < bad <= 8
    saved = sorted(int(d.name) for d in (model_dir / "checkpoints").iterdir() if d.name.isdigit())
    assert saved[-1] == good
    assert all(np.isfinite(np.load(model_dir / "prompts" / f"{s}.npy")).all() for s in saved)
    assert not (model_dir / "prompts" / f"{bad}.npy").exists()


# ------------------------------------------------------------------------ the source

def test_no_code_path_unpickles():
    pattern = re.compile(r"pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*"
                         r"weights_only\s*=\s*True)")
    offenders = []
    for path in list((REPO_ROOT / "prompt_jax").rglob("*.py")) + list(
            (REPO_ROOT / "tasks").rglob("*.py")) + list((REPO_ROOT / "scripts").rglob("*.py")) \
            + list((REPO_ROOT / "bench").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
