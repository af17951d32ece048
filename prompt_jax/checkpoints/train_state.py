"""Train-state checkpoints with orbax: atomic, keep-N, restored directly sharded.

Only what training changes is saved (step, trainable params, optimizer state);
the frozen weights are never rewritten into a checkpoint. orbax writes each
step to a temporary directory and renames it when complete, so an interrupted
save leaves the previous checkpoints intact; a complete but unreadable step
falls back to the newest readable one, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax
import jax

log = logging.getLogger(__name__)


class TrainStateCheckpointer:
    """`save(step, state)` / `restore(abstract_state) -> (state, step) | None` under `directory`."""

    def __init__(self, directory: str, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))

    @staticmethod
    def existing_steps(directory: str) -> list[int]:
        """Steps saved under `directory`, without opening a manager (finished saves only)."""
        if not os.path.isdir(directory):
            return []
        return sorted(int(d) for d in os.listdir(directory) if d.isdigit())

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any) -> None:
        """Save `state` (a TrainState) as step `step`; collective across processes."""
        tree = flax.serialization.to_state_dict(state)
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()

    def restore(self, abstract_state: Any, shardings: Any) -> tuple[Any, int] | None:
        """Newest readable step restored with `shardings` (a tree like the state's), or None.

        `abstract_state` is a TrainState of ShapeDtypeStructs (from `jax.eval_shape`).
        """
        template = flax.serialization.to_state_dict(abstract_state)
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), template,
            flax.serialization.to_state_dict(shardings))
        for step in reversed(self.steps()):
            try:
                tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
            except Exception as e:  # a damaged step: set it aside, say so, try the one before
                aside = os.path.join(self.directory, f"{step}.unreadable")
                if jax.process_index() == 0:
                    os.replace(os.path.join(self.directory, str(step)), aside)
                self.manager.reload()
                log.warning("checkpoint %s/%d is unreadable (%s)", self.directory, step, e)
                print(f"warning: checkpoint {self.directory}/{step} is unreadable "
                      f"({type(e).__name__}); moved it to {aside} and falling back to an "
                      "older checkpoint", flush=True)
                continue
            return flax.serialization.from_state_dict(abstract_state, tree), step
        return None

    def close(self) -> None:
        self.manager.close()
