"""Train-state checkpoints with orbax: atomic, keep-N, checksummed, restored directly sharded.

Only what training changes is saved (step, trainable params, optimizer state); the frozen
weights are never rewritten into a checkpoint. orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save leaves the previous
checkpoints intact.

orbax does not catch every damaged byte: arrays of at most 1 KiB are stored inline in
OCDBT's b-tree nodes, which carry a crc32c (a flipped byte there fails the restore with
DATA_LOSS), but larger chunks go to OCDBT data files with no checksum, and a flipped byte
in a zstd literal still decodes: the restore returns wrong values without complaint
(tests/test_checkpoint_integrity.py shows both). So each step also holds
`<step>/checksums.json`, written by process 0 after orbax has finished, atomically
(temporary file, fsync, rename)::

    {"format": "prompt_jax/train_state_checksums/1", "step": 8, "hash": "sha256",
     "leaves": {"trainable/prompt": {"shape": [20, 64], "dtype": "float32",
                                     "sha256": "<hex of the C-order host bytes>"}, ...}}

Leaves are named by their path in `flax.serialization.to_state_dict(state)`. `restore`
verifies what it restored, on every process (the processes agree: one process's failure
fails the step everywhere), from the newest step back; a step is damaged when it is
unreadable, when a leaf does not match, or when its `checksums.json` is malformed or
missing. A step without `checksums.json` is accepted, unverified and with a warning, only
when no step in the directory has one: a run checkpointed before checksums were recorded
(and a first save cut short between orbax's commit and the manifest, whose data orbax had
committed). A crash after a later save's commit and before its manifest leaves a step that
falls back, as it should: nothing vouches for it.

Damaged steps: `restore` changes nothing on disk (a resume that fails, or a read error on
one host, must not alter the checkpoints; processes never race on a rename). It warns and
falls back to the newest good step, or raises `CheckpointError` when none is good. The
first `save` afterwards moves the damaged steps it found to `<step>.damaged` (then
`<step>.damaged-2`, ...) beside the others: orbax refuses to save over an existing step,
and its keep-N collection counts every step directory, so a damaged step left in place
would block the resumed run's save of that step and could make orbax delete the good
checkpoint while keeping the damaged one. Nothing is deleted: orbax lists and collects
only digit-named directories, so the moved steps stay until removed by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from typing import Any

import flax
import jax
import numpy as np

from prompt_jax.files import write_text_atomically

log = logging.getLogger(__name__)

MANIFEST = "checksums.json"
FORMAT = "prompt_jax/train_state_checksums/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """No train-state checkpoint in a directory that holds some is good."""


class TrainStateCheckpointer:
    """`save(step, state)` / `restore(abstract_state, shardings) -> (state, step) | None`
    under `directory`, each step checksummed (module docstring)."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))
        self._damaged: dict[int, str] = {}  # step -> why, found by this checkpointer
        self._verified: set[int] = set()  # steps read back and matched
        self._target: Any = None  # the state dict's ShapeDtypeStructs, with shardings

    @staticmethod
    def existing_steps(directory: str) -> list[int]:
        """Steps saved under `directory`, without opening a manager (finished saves only)."""
        if not os.path.isdir(directory):
            return []
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit())

    def steps(self) -> list[int]:
        """Saved steps, less those this checkpointer found damaged."""
        return sorted(s for s in self.manager.all_steps() if s not in self._damaged)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def verified(self, step: int) -> bool:
        """Whether step `step` was read back and matches its checksums; a step not yet
        checked is read back now (collective: call it on every process); False for a step
        without checksums."""
        if (step not in self._verified and step not in self._damaged
                and os.path.exists(self._manifest_path(step))):
            self._read(step, self._target)
        return step in self._verified

    def save(self, step: int, state: Any) -> None:
        """Save `state` (a TrainState) as step `step`, then its checksums; collective."""
        self._set_aside_damaged()
        tree = flax.serialization.to_state_dict(state)
        leaves = _checksums(tree)
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            write_text_atomically(self._manifest_path(step), json.dumps(
                {"format": FORMAT, "step": step, "hash": "sha256", "leaves": leaves},
                indent=1, sort_keys=True))
        _barrier(f"prompt_jax:checksums:{step}")
        self._verified.discard(step)
        self._target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding",
                                                                              None)), tree)

    def restore(self, abstract_state: Any, shardings: Any) -> tuple[Any, int] | None:
        """Newest good step restored with `shardings` (a tree like the state's), or None
        when there is no step; `CheckpointError` when there are steps and none is good.

        `abstract_state` is a TrainState of ShapeDtypeStructs (from `jax.eval_shape`).
        """
        template = flax.serialization.to_state_dict(abstract_state)
        self._target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), template,
            flax.serialization.to_state_dict(shardings))
        steps = self.steps()
        for i, step in reversed(list(enumerate(steps))):
            tree = self._read(step, self._target)
            if tree is not None:
                return flax.serialization.from_state_dict(abstract_state, tree), step
            if i > 0:
                self._warn(f"checkpoint {self.directory}/{step} is damaged "
                           f"({self._damaged[step]}); falling back to an older checkpoint")
        if steps:
            found = "; ".join(f"step {s}: {self._damaged[s]}" for s in reversed(steps))
            raise CheckpointError(f"{self.directory}: no good checkpoint ({found}); nothing "
                                  "was moved or deleted")
        return None

    def close(self) -> None:
        self.manager.close()

    # ------------------------------------------------------------------ internals

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _manifest_path(self, step: int) -> str:
        return os.path.join(self._step_path(step), MANIFEST)

    def _read(self, step: int, target: Any) -> Any | None:
        """Step `step`'s state dict if it is good (recorded in `_verified` when checked
        against its checksums), else None with the reason in `_damaged`; collective."""
        manifest, reason = None, None
        if os.path.exists(self._manifest_path(step)):
            try:
                manifest = _load_manifest(self._manifest_path(step), step)
            except ValueError as e:
                reason = f"{MANIFEST} is malformed: {e}"
        elif any(os.path.exists(self._manifest_path(s))
                 for s in self.existing_steps(self.directory)):
            reason = f"{MANIFEST} is missing"
        tree = None
        if reason is None:
            try:
                tree = self.manager.restore(
                    step, args=self._ocp.args.StandardRestore(target))
            except Exception as e:  # whatever orbax or tensorstore raise for bad bytes
                reason = f"unreadable: {type(e).__name__}: {_first_line(e)}"
        if not _everywhere(reason is None):
            reason = reason or "unreadable on another process"
        if reason is None and manifest is not None:  # the same on every process: the
            reason = _mismatch(manifest["leaves"], _checksums(tree))  # leaves are global
        if reason is not None:
            self._damaged[step] = reason
            return None
        if manifest is None:
            self._warn(f"checkpoint {self.directory}/{step} has no {MANIFEST} (saved before "
                       "checksums were recorded); restoring it unverified")
        else:
            self._verified.add(step)
        return tree

    def _set_aside_damaged(self) -> None:
        """Move the damaged steps found to `<step>.damaged`, out of orbax's way."""
        if not self._damaged:
            return
        if jax.process_index() == 0:
            for step in sorted(self._damaged):
                source = self._step_path(step)
                if not os.path.isdir(source):
                    continue
                aside, n = f"{source}.damaged", 1
                while os.path.exists(aside):
                    n += 1
                    aside = f"{source}.damaged-{n}"
                os.rename(source, aside)
                self._warn(f"moved damaged checkpoint {source} to {aside}")
        _barrier("prompt_jax:set_aside_damaged")
        self._damaged.clear()
        self.manager.reload()

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        if jax.process_index() == 0:
            print(f"warning: {message}", flush=True)


# ---------------------------------------------------------------------- checksums


def _checksums(tree: Any) -> dict[str, dict[str, Any]]:
    """{leaf path: {shape, dtype, sha256 of the C-order host bytes}}; collective when a
    leaf spans processes (it is gathered to every host)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        host = np.ascontiguousarray(_to_host(leaf))
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[name] = {"shape": list(host.shape), "dtype": host.dtype.name,
                     "sha256": hashlib.sha256(host.tobytes()).hexdigest()}
    return out


def _to_host(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _mismatch(expected: dict[str, dict], found: dict[str, dict]) -> str | None:
    """Why `found` (restored leaves) does not match `expected` (the manifest's), or None."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        return (f"its leaves differ from {MANIFEST}'s (not restored: {missing or 'none'}; "
                f"not listed: {extra or 'none'})")
    bad = []
    for name, want in sorted(expected.items()):
        differs = [k for k in ("shape", "dtype", "sha256") if want[k] != found[name][k]]
        if differs:
            bad.append(f"{name} ({differs[0]})")
    if not bad:
        return None
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"does not match {MANIFEST}: {', '.join(bad[:3])}{more}"


def _load_manifest(path: str, step: int) -> dict[str, Any]:
    """The manifest at `path`, checked to be one for step `step`; ValueError saying why not."""
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{type(e).__name__}: {_first_line(e)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file")
    if manifest.get("step") != step or manifest.get("hash") != "sha256":
        raise ValueError(f"it is for step {manifest.get('step')!r} with hash "
                         f"{manifest.get('hash')!r}, expected step {step} with sha256")
    leaves = manifest.get("leaves")
    if not isinstance(leaves, dict) or not all(
            isinstance(v, dict) and set(v) == {"shape", "dtype", "sha256"}
            and isinstance(v["shape"], list) and all(type(d) is int for d in v["shape"])
            and isinstance(v["dtype"], str) and _SHA256.match(str(v["sha256"]))
            for v in leaves.values()):
        raise ValueError("'leaves' is not a map of {shape, dtype, sha256} entries")
    return manifest


# ---------------------------------------------------------------------- helpers


def _everywhere(ok: bool) -> bool:
    """`ok` on every process (collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
    return text if len(text) <= limit else text[:limit] + "..."
