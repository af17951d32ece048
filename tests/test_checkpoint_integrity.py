"""Train-state checkpoints whose bytes are damaged on disk are caught, named, and skipped.

The states are small but hold an [8, 64] float32 prompt (2 KiB): orbax stores chunks over
1 KiB outside OCDBT's checksummed b-tree nodes, where a damaged byte goes unnoticed by
orbax itself (the first tests show what orbax catches alone and what it does not).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from prompt_jax import cli
from prompt_jax.checkpoints.train_state import CheckpointError, TrainStateCheckpointer
from prompt_jax.train_step import TrainState

TX = optax.adam(1e-2)


def make_state(seed: int, step: int) -> TrainState:
    rng = np.random.default_rng(seed)
    trainable = {"prompt": jnp.asarray(rng.normal(size=(8, 64)), jnp.float32),
                 "scale": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    state = TrainState.create(trainable, TX)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, opt_state = TX.update(grads, state.opt_state, trainable)
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      trainable=optax.apply_updates(trainable, updates), opt_state=opt_state)


STATES = {1: make_state(1, 1), 2: make_state(2, 2)}


@pytest.fixture
def saved(tmp_path) -> pathlib.Path:
    """Steps 1 and 2 (STATES) saved under tmp_path/ckpt."""
    directory = tmp_path / "ckpt"
    checkpointer = TrainStateCheckpointer(str(directory), keep=3)
    for step, state in STATES.items():
        checkpointer.save(step, state)
    checkpointer.close()
    return directory


def restore(directory: pathlib.Path, keep: int = 3):
    """(checkpointer, restore's result) on a fresh checkpointer, as a resumed run does."""
    checkpointer = TrainStateCheckpointer(str(directory), keep)
    abstract = jax.eval_shape(lambda: STATES[1])
    shardings = jax.tree.map(lambda x: x.sharding, STATES[1])
    return checkpointer, checkpointer.restore(abstract, shardings)


def data_file(step_dir: pathlib.Path) -> pathlib.Path:
    """The largest file orbax wrote for a step: the OCDBT data file that holds the chunks
    over 1 KiB (`default/ocdbt.process_0/d/<id>`)."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def btree_file(step_dir: pathlib.Path) -> pathlib.Path:
    """OCDBT's root b-tree node (`default/d/<id>`): keys, metadata, chunks up to 1 KiB."""
    (path,) = (step_dir / "default" / "d").iterdir()
    return path


def flip_middle(path: pathlib.Path, count: int = 4) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_state_equal(restored: TrainState, expected: TrainState) -> None:
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------ orbax by itself


def orbax_restore(directory: pathlib.Path, step: int):
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          flax.serialization.to_state_dict(STATES[step]))
    manager = ocp.CheckpointManager(directory)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(target))
    finally:
        manager.close()


def test_orbax_alone_restores_a_damaged_large_array_without_complaint(saved):
    """The reason for checksums: a flipped byte in a chunk over 1 KiB still decodes."""
    flip_middle(data_file(saved / "2"))
    tree = orbax_restore(saved, 2)
    prompt = np.asarray(tree["trainable"]["prompt"])
    assert prompt.shape == (8, 64)
    assert not np.array_equal(prompt, np.asarray(STATES[2].trainable["prompt"]))


def test_orbax_alone_catches_damage_to_its_btree(saved):
    """Small arrays and metadata live in OCDBT's b-tree nodes, which carry a crc32c."""
    flip_middle(btree_file(saved / "2"))
    with pytest.raises(ValueError, match="DATA_LOSS"):
        orbax_restore(saved, 2)


# ------------------------------------------------------------------ the checkpointer


def test_each_step_records_every_leaf(saved):
    manifest = json.loads((saved / "2" / "checksums.json").read_text())
    assert manifest["step"] == 2 and manifest["hash"] == "sha256"
    assert manifest["leaves"]["trainable/prompt"]["shape"] == [8, 64]
    assert manifest["leaves"]["trainable/prompt"]["dtype"] == "float32"
    leaves = jax.tree_util.tree_flatten_with_path(
        flax.serialization.to_state_dict(STATES[2]))[0]
    assert set(manifest["leaves"]) == {"/".join(k.key for k in path) for path, _ in leaves}
    assert not list(saved.rglob("*.tmp"))


def test_a_good_checkpoint_restores_verified(saved):
    checkpointer, (state, step) = restore(saved)
    assert step == 2 and checkpointer.verified(2)
    assert_state_equal(state, STATES[2])
    assert checkpointer.verified(1)  # read back on demand


@pytest.mark.parametrize("damage,reason", [
    (lambda d: flip_middle(data_file(d)), r"does not match checksums\.json: \S+ \(sha256\)"),
    (lambda d: flip_middle(btree_file(d)), r"unreadable: ValueError: DATA_LOSS"),
    (lambda d: (d / "checksums.json").unlink(), r"checksums\.json is missing"),
    (lambda d: (d / "checksums.json").write_text('{"format": '),
     r"checksums\.json is malformed: JSONDecodeError"),
    (lambda d: shutil.copy(d.parent / "1" / "checksums.json", d / "checksums.json"),
     r"checksums\.json is malformed: it is for step 1"),
    (lambda d: edit_manifest(d, lambda leaves: leaves["trainable/prompt"].update(
        sha256="0" * 64)), r"does not match checksums\.json: trainable/prompt \(sha256\)"),
    (lambda d: edit_manifest(d, lambda leaves: leaves["trainable/scale"].update(shape=[4])),
     r"does not match checksums\.json: trainable/scale \(shape\)"),
    (lambda d: edit_manifest(d, lambda leaves: leaves.pop("trainable/scale")),
     r"its leaves differ from checksums\.json's \(not restored: none; not listed: "
     r"\['trainable/scale'\]\)"),
], ids=["data-bytes", "btree-bytes", "manifest-missing", "manifest-truncated",
        "manifest-of-another-step", "checksum-edited", "shape-edited", "leaf-dropped"])
def test_a_damaged_step_falls_back_to_the_newest_good_one(saved, damage, reason, capsys):
    damage(saved / "2")
    before = snapshot(saved)
    checkpointer, (state, step) = restore(saved)
    out = capsys.readouterr().out
    warning = re.search(rf"warning: checkpoint {re.escape(str(saved))}/2 is damaged \((.*)\); "
                        r"falling back to an older checkpoint", out)
    assert warning and re.search(reason, warning.group(1)), out
    assert step == 1
    assert_state_equal(state, STATES[1])
    assert checkpointer.verified(1) and not checkpointer.verified(2)
    assert checkpointer.steps() == [1] and checkpointer.latest_step() == 1
    assert snapshot(saved) == before  # restoring moves and deletes nothing


def edit_manifest(step_dir: pathlib.Path, edit) -> None:
    path = step_dir / "checksums.json"
    manifest = json.loads(path.read_text())
    edit(manifest["leaves"])
    path.write_text(json.dumps(manifest))


def test_no_good_checkpoint_raises_and_keeps_every_file(saved):
    flip_middle(data_file(saved / "2"))
    (saved / "1" / "checksums.json").write_text("[]")
    before = snapshot(saved)
    with pytest.raises(CheckpointError) as raised:
        restore(saved)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{saved}: no good checkpoint (step 2: does not match "
                              "checksums.json: ")
    assert "; step 1: checksums.json is malformed: not a " in message
    assert message.endswith("); nothing was moved or deleted")
    assert snapshot(saved) == before


def test_the_next_save_sets_damaged_steps_aside_and_keep_counts_good_ones(saved, capsys):
    """keep=2 with steps 1, 2 (damaged): after resuming at 1 and saving 3, orbax keeps
    1 and 3; a damaged step left in place would have counted, and 1 would be gone."""
    flip_middle(data_file(saved / "2"))
    damaged = snapshot(saved / "2")
    checkpointer, (_, step) = restore(saved, keep=2)
    assert step == 1
    checkpointer.save(3, STATES[2].replace(step=jnp.asarray(3, jnp.int32)))
    assert checkpointer.steps() == [1, 3]
    assert f"moved damaged checkpoint {saved}/2 to {saved}/2.damaged" in capsys.readouterr().out
    assert snapshot(saved / "2.damaged") == damaged
    checkpointer.save(2, STATES[2])  # the damaged step's number is free again
    checkpointer.close()
    assert TrainStateCheckpointer.existing_steps(str(saved)) == [2, 3]
    checkpointer, (state, step) = restore(saved)
    assert step == 3 and checkpointer.verified(2) and checkpointer.verified(3)
    assert (saved / "2.damaged").is_dir()


def test_steps_saved_before_checksums_restore_unverified(saved, capsys):
    for manifest in saved.glob("*/checksums.json"):
        manifest.unlink()
    checkpointer, (state, step) = restore(saved)
    assert step == 2 and not checkpointer.verified(2)
    assert_state_equal(state, STATES[2])
    assert (f"warning: checkpoint {saved}/2 has no checksums.json (saved before checksums "
            "were recorded); restoring it unverified") in capsys.readouterr().out


# ------------------------------------------------------------------ the train job

# tests/test_train_job.py's FAST, with an [8, 64] prompt (over orbax's 1 KiB inline limit)
# and no eval: the prompt is the thing compared.
FAST = ["--gin.INITIAL_CHECKPOINT=None", "--gin.ModelSpec.size='tiny'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 48, 'targets': 8}", "--gin.BATCH_SIZE=4",
        "--gin.PROMPT_LENGTH=8", "--gin.ModelSpec.dropout_rate=0.0",
        "--gin.train.eval_split=None"]


def train_args(model_dir, steps, period=2):
    return ["train", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.EVAL_PERIOD={period}", "--gin.train.log_period=1", *FAST]


@pytest.fixture
def compilation_cache(tmp_path):
    """An XLA compilation cache for this test only: its three runs build the same programs,
    and compiling them dominates a tiny run (tens of seconds on a loaded CPU)."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", previous)
    cache.reset_cache()


def test_resume_past_a_damaged_checkpoint_ends_with_the_uninterrupted_prompt(
        tmp_path, capsys, compilation_cache):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli.main(train_args(straight, 6)) == 0
    assert cli.main(train_args(resumed, 4)) == 0  # checkpoints at 2 and 4
    flip_middle(data_file(resumed / "checkpoints" / "4"))
    damaged = snapshot(resumed / "checkpoints" / "4")
    capsys.readouterr()

    assert cli.main(train_args(resumed, 6)) == 0
    out = capsys.readouterr().out
    assert re.search(rf"warning: checkpoint {re.escape(str(resumed))}/checkpoints/4 is damaged "
                     r"\(does not match checksums\.json: .*\); falling back", out), out
    assert "resuming" in out and "from step 2" in out
    np.testing.assert_array_equal(np.load(resumed / "prompts" / "6.npy"),
                                  np.load(straight / "prompts" / "6.npy"))
    ckpts = resumed / "checkpoints"
    assert TrainStateCheckpointer.existing_steps(str(ckpts)) == [4, 6]
    assert snapshot(ckpts / "4.damaged") == damaged
