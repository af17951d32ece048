"""Metrics as the SuperGLUE and GLUE leaderboards compute them, in percent (0-100).

Every metric takes `(targets, predictions)` of postprocessed values and returns a
dict of floats. A prediction that is no class (-1: the model emitted another
string) counts as wrong everywhere: in F1 and Matthews correlation it is taken as
the class opposite to the target, as T5's `f1_score_with_invalid` does.

| task | metrics (keys) |
| --- | --- |
| BoolQ, COPA, RTE, WiC, WSC, SST-2 | `accuracy` |
| CB | `mean_3class_f1` (macro F1), `accuracy` |
| MultiRC | `f1a` (binary F1 over all answers), `exact_match` (per question) |
| ReCoRD | `f1`, `exact_match` (max over gold answers, SQuAD normalization) |
| AX-b | `matthews_corrcoef` |
| AX-g | `gender_parity`, `accuracy` |
| MRPC, QQP | `f1` (positive class), `accuracy` |

`superglue_score` averages per-task scores as the leaderboard does.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np


def _valid_binary(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64).copy()
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} targets but {p.shape[0]} predictions")
    invalid = (p != 0) & (p != 1)
    p[invalid] = 1 - t[invalid]
    return t, p


def _f1(tp: int, fp: int, fn: int) -> float:
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    t, p = np.asarray(targets), np.asarray(predictions)
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} targets but {p.shape[0]} predictions")
    return {"accuracy": 100.0 * float(np.mean(t == p))}


def f1_binary(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """F1 of the positive class (label 1)."""
    t, p = _valid_binary(targets, predictions)
    tp, fp, fn = (
        np.sum((p == 1) & (t == 1)),
        np.sum((p == 1) & (t == 0)),
        np.sum((p == 0) & (t == 1)),
    )
    return {"f1": 100.0 * _f1(int(tp), int(fp), int(fn))}


def mean_3class_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Unweighted mean of the per-class F1 over classes 0, 1, 2 (CB)."""
    t, p = np.asarray(targets), np.asarray(predictions)
    f1s = [
        _f1(int(np.sum((p == c) & (t == c))), int(np.sum((p == c) & (t != c))),
            int(np.sum((p != c) & (t == c))))
        for c in range(3)
    ]  # fmt: skip
    return {"mean_3class_f1": 100.0 * float(np.mean(f1s))}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Matthews correlation of binary labels (AX-b); 0 when a margin is empty."""
    t, p = _valid_binary(targets, predictions)
    tp, tn = int(np.sum((p == 1) & (t == 1))), int(np.sum((p == 0) & (t == 0)))
    fp, fn = int(np.sum((p == 1) & (t == 0))), int(np.sum((p == 0) & (t == 1)))
    denominator = np.sqrt(float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "matthews_corrcoef": 0.0 if denominator == 0 else 100.0 * (tp * tn - fp * fn) / denominator
    }


def multirc_f1a(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """F1a: binary F1 over every answer option of every question."""
    f1 = f1_binary([t["value"] for t in targets], [p["value"] for p in predictions])["f1"]
    return {"f1a": f1}


def multirc_exact_match(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """Mean over questions ("group") of 1 when every answer option of it is labelled right."""
    groups: dict = collections.defaultdict(list)
    for t, p in zip(targets, predictions, strict=True):
        groups[t["group"]].append(t["value"] == p["value"])
    return {"exact_match": 100.0 * float(np.mean([all(v) for v in groups.values()]))}


def normalize_answer(text: str) -> str:
    """SQuAD/ReCoRD normalization: lowercase, no punctuation, no a/an/the, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(gold: str, prediction: str) -> float:
    g, p = gold.split(), prediction.split()
    common = sum((collections.Counter(g) & collections.Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def record_f1_em(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """Token F1 and exact match, each the max over a query's gold answers, then the mean
    over queries; a query repeated (one example per gold answer) counts once.
    """
    f1s, ems, seen = [], [], set()
    for t, p in zip(targets, predictions, strict=True):
        if t["group"] in seen:
            continue
        seen.add(t["group"])
        golds, pred = [normalize_answer(a) for a in t["value"]], normalize_answer(p["value"])
        f1s.append(max((_token_f1(g, pred) for g in golds), default=0.0))
        ems.append(max((float(g == pred) for g in golds), default=0.0))
    return {"f1": 100.0 * float(np.mean(f1s)), "exact_match": 100.0 * float(np.mean(ems))}


def axg_accuracy(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    return accuracy([t["value"] for t in targets], [p["value"] for p in predictions])


def gender_parity(targets: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """Percent of minimal pairs ("group") whose two predictions agree (AX-g)."""
    pairs: dict = collections.defaultdict(list)
    for t, p in zip(targets, predictions, strict=True):
        pairs[t["group"]].append(p["value"])
    return {"gender_parity": 100.0 * float(np.mean([len(set(v)) == 1 for v in pairs.values()]))}


# The eight tasks of the SuperGLUE score; the diagnostics AX-b and AX-g are not in it.
SUPERGLUE_SCORED_TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")


def superglue_score(scores: Mapping[str, Mapping[str, float]]) -> float:
    """The SuperGLUE score: the mean over the eight tasks of each task's mean metric.

    Args:
      scores: task -> {metric: value}, task named `super_glue_rte`, `super_glue_rte_sentinel`
        or `rte`; tasks with two metrics (CB, MultiRC, ReCoRD) contribute their mean.
    """
    by_task = {}
    for name, metrics in scores.items():
        short = name.removeprefix("super_glue_").removesuffix("_sentinel")
        if short in SUPERGLUE_SCORED_TASKS:
            by_task[short] = float(np.mean(list(metrics.values())))
    missing = [t for t in SUPERGLUE_SCORED_TASKS if t not in by_task]
    if missing:
        raise ValueError(f"SuperGLUE score needs all eight tasks; missing {missing}")
    return float(np.mean([by_task[t] for t in SUPERGLUE_SCORED_TASKS]))
