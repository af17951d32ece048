"""Run logs: `metrics.jsonl`, TensorBoard scalars and the progress bar.

Every line of `metrics.jsonl` is one JSON object with at least `step`; train
lines carry `loss` (cross-entropy per target token) and `objective` (the summed loss
that is differentiated), eval lines carry `split`, `loss` and the task's metric names.
Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


def is_primary() -> bool:
    return jax.process_index() == 0


class RunLog:
    """Appends to `MODEL_DIR/metrics.jsonl` and TensorBoard (`MODEL_DIR/tb/<split>`)."""

    def __init__(self, model_dir: str):
        from prompt_jax import model_dir as layout

        self.path = layout.path(model_dir, layout.METRICS)
        self.tb_dir = layout.path(model_dir, layout.TENSORBOARD)
        self._writers: dict[str, Any] = {}
        self.primary = is_primary()

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run redoes those steps)."""
        if not self.primary or not os.path.exists(self.path):
            return
        from prompt_jax.files import write_text_atomically

        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomically(self.path, "".join(kept))

    def write(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.primary:
            return
        record = {"step": int(step)}
        if split != "train":
            record["split"] = split
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer(split)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    writer.add_scalar(k, v, step)
            writer.flush()

    def _writer(self, split: str):
        if split not in self._writers:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # TensorBoard is optional; metrics.jsonl is the record
                self._writers[split] = None
            else:
                self._writers[split] = SummaryWriter(os.path.join(self.tb_dir, split))
        return self._writers[split]

    def close(self) -> None:
        for w in self._writers.values():
            if w is not None:
                w.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Progress:
    """A progress bar with step, loss, examples/s and ETA (tqdm), on process 0 only."""

    def __init__(self, total: int, initial: int, batch_size: int, desc: str = "train"):
        from tqdm import tqdm

        self.batch_size = batch_size
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not is_primary(), file=sys.stderr, mininterval=0.5)
        self._t0, self._s0 = time.perf_counter(), initial

    def update(self, step: int, loss: float) -> float:
        """Advance to `step`; returns the examples/s since the last call."""
        now = time.perf_counter()
        rate = (step - self._s0) * self.batch_size / max(now - self._t0, 1e-9)
        self._t0, self._s0 = now, step
        self.bar.set_postfix(loss=f"{loss:.4g}", ex_per_s=f"{rate:.1f}", refresh=False)
        self.bar.update(step - self.bar.n)
        return rate

    def write(self, message: str) -> None:
        if is_primary():
            self.bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
