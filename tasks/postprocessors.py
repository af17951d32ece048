"""Postprocessors: decoded strings -> the values the metrics take, as T5's do.

Each has seqio's signature `fn(string, example=None, is_target=False)`: `example` is
the task's example (numpy values, bytes for strings) and `is_target` tells whether
`string` is the target or the model's prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

SENTINEL = "<extra_id_0>"
_WSC_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this those which "
    "whose your".split()
)


def _text(s) -> str:
    return s.decode("utf-8") if isinstance(s, bytes) else str(s)


def class_id(label_classes: Sequence[str]) -> Callable[..., int]:
    """The index of the string in `label_classes`, -1 when it is none of them."""
    classes = tuple(label_classes)

    def fn(string, example=None, is_target=False) -> int:
        del example, is_target
        s = _text(string)
        return classes.index(s) if s in classes else -1

    return fn


def multirc(string, example=None, is_target=False) -> dict:
    """{"value": 0/1/-1}; a target also carries its question as "group" (for exact match)."""
    out = {"value": class_id(("False", "True"))(string)}
    if is_target:
        out["group"] = (int(example["idx/paragraph"]), int(example["idx/question"]))
    return out


def record(string, example=None, is_target=False) -> dict:
    """A prediction: {"value": answer}; a target: all gold answers and the query as "group"."""
    if is_target:
        return {
            "value": [_text(a) for a in example["answers"]],
            "group": (int(example["idx/passage"]), int(example["idx/query"])),
        }
    return {"value": _text(string)}


def axg(string, example=None, is_target=False) -> dict:
    """{"value": class id}; a target also carries its minimal pair as "group".

    AX-g lists each pair of sentences differing only in the pronoun's gender on
    consecutive lines, idx 2k and 2k+1; the pair is idx // 2.
    """
    out = {"value": class_id(("entailment", "not_entailment"))(string)}
    if is_target:
        out["group"] = int(example["idx"]) // 2
    return out


def wsc_simple(string, example=None, is_target=False) -> int:
    """T5's WSC: 1 when the predicted referent names the candidate (`targets_pretokenized`).

    Case and determiners are ignored, and one word set containing the other counts
    ("fuzzy bunny" names "bunny"), unless only one of them is possessive. A target is
    the example's label (1 when the candidate is the true referent). An empty
    prediction is -1, wrong whatever the label.
    """
    if is_target:
        return int(example["label"])

    def clean(s: str) -> str:
        return " ".join(w for w in s.strip().lower().split(" ") if w not in _WSC_DETERMINERS)

    prediction = clean(_text(string))
    if not prediction:
        return -1
    referent = clean(_text(example["targets_pretokenized"]))
    if ("'" in prediction) != ("'" in referent):
        return 0
    p, r = set(prediction.split(" ")), set(referent.split(" "))
    return int(p <= r or r <= p)


def strip_sentinel(postprocess_fn: Callable | None) -> Callable:
    """The `_sentinel` tasks' postprocessor: drops a leading `<extra_id_0>`, then applies
    `postprocess_fn` (the string itself when None)."""

    def fn(string, example=None, is_target=False):
        s = _text(string)
        if s.startswith(SENTINEL):
            s = s[len(SENTINEL) :].strip()
        if postprocess_fn is None:
            return s
        return postprocess_fn(s, example=example, is_target=is_target)

    return fn
