"""How the reproduction scripts score runs: a task's score from its metrics, the score of a
set of tasks (SuperGLUE's over the eight), the majority-class baseline, mean ± std over
seeds, and the parameter count that labels a model size.
"""

from __future__ import annotations

import collections
import functools
import math
import sys
from collections.abc import Mapping, Sequence

from jobs import config_name

from prompt_jax.cli import stderr_silenced
from prompt_jax.evaluation import is_loss

# prompt_jax.tasks.metrics.SUPERGLUE_SCORED_TASKS with their task names; not read from
# there because importing prompt_jax.tasks loads TensorFlow (10 s), which `--help` and the
# command line do not need (tests/test_scripts.py checks that the two agree).
SUPERGLUE = tuple(f"super_glue_{t}" for t in
                  ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"))
# Reported beside the task's official metrics, never averaged into its score.
DIAGNOSTICS = ("rank_accuracy",)


def tasks_module():
    """prompt_jax.tasks, imported with TensorFlow's start-up lines on stderr hidden."""
    with stderr_silenced("prompt_jax.tasks" not in sys.modules):
        from prompt_jax import tasks
    return tasks


def missing_official_files(data_dir: str, task: str) -> list[str]:
    """The official files of `task`'s train and validation splits (e.g. glue_sst2:
    glue/SST-2/{train,dev}.tsv) that are absent under `data_dir`."""
    official = tasks_module().official
    short = task.removesuffix("_sentinel").removeprefix("super_glue_").removeprefix("glue_")
    missing = []
    for split in ("train", "validation"):
        try:
            official.official_file(str(data_dir), short, split)
        except FileNotFoundError as e:
            missing.append(str(e).split(":")[0])
    return missing


def task_score(metrics: Mapping[str, float]) -> float:
    """A task's score: the mean of its metrics (SuperGLUE's convention for CB, MultiRC, ReCoRD)."""
    values = [v for k, v in metrics.items() if not is_loss(k) and k not in DIAGNOSTICS]
    return float(sum(values) / len(values))


def aggregate(by_task: Mapping[str, Mapping[str, float]]) -> float:
    """The SuperGLUE score over the eight tasks; otherwise the mean task score."""
    if {t.removesuffix("_sentinel") for t in by_task} >= set(SUPERGLUE):
        return tasks_module().superglue_score(by_task)
    return float(sum(task_score(m) for m in by_task.values()) / len(by_task))


def majority_score(examples: Mapping[str, Sequence]) -> float:
    """The score (as `aggregate`) of always predicting each task's most frequent target;
    `examples`: task -> its validation examples (prompt_jax.infer.Example)."""
    from prompt_jax import infer

    by_task = {}
    for task, rows in examples.items():
        common_target = collections.Counter(e.targets for e in rows).most_common(1)[0][0]
        by_task[task] = infer.task_metrics(task, rows, [{"prediction": common_target}] * len(rows))
    return aggregate(by_task)


def score_label(tasks: Sequence[str], metrics: Mapping[str, float] | None = None) -> str:
    if set(tasks) >= set(SUPERGLUE):
        return "SuperGLUE score"
    if len(tasks) == 1:
        names = [k for k in (metrics or {}) if not is_loss(k)] or ["score"]
        short = tasks[0].removeprefix("super_glue_").removeprefix("glue_").upper()
        return f"{short} {'/'.join(names)}"
    return f"mean score over {', '.join(tasks)}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def fmt(values: Sequence[float] | None, digits: int = 1) -> str:
    """`mean ± std` of a run's seeds (or a single value); '—' for none."""
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


@functools.cache
def param_count(size: str) -> int:
    """Parameters of the frozen model of a size (its `ModelSpec.size` in the gin file)."""
    import jax
    import numpy as np

    from prompt_jax.t5.config import get_config
    from prompt_jax.t5.model import abstract_params

    shapes = abstract_params(get_config(config_name(size)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def human(n: float) -> str:
    """A parameter count as the paper writes it: 2.65M, 11B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))
