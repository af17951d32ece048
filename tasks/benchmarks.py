"""The registered tasks: one table of SuperGLUE/GLUE specs, their taskless and sentinel
variants, the SuperGLUE mixture and the two pretraining objectives.

Each spec `<task>` is registered four times: `<task>`, `<task>_sentinel`,
`taskless_<task>` and `taskless_<task>_sentinel`. A `taskless_` variant is its base task
with the first word of the inputs (the task name, e.g. "rte") removed, as the
prompt-tuning reference's `taskless_*` tasks (`prompt_tuning/data/super_glue.py`,
`glue.py`); same source, targets, postprocessor and metrics. The reference names them
`taskless_super_glue_<task>_v102` / `taskless_glue_<task>_v002` (WSC as
`taskless_super_glue_wsc_v102_simple_{train,eval}`) and has no `_sentinel` ones; the
names here follow this package's (no TFDS version; one WSC task).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Sequence

import seqio
import tensorflow as tf
from prompt_jax.tasks import formats, metrics, postprocessors, pretraining
from prompt_jax.tasks.config import OUTPUT_FEATURES
from prompt_jax.tasks.sources import BenchmarkSource, TextSource

from prompt_jax.methods import templates

SENTINEL_SUFFIX = "_sentinel"
TASKLESS_PREFIX = "taskless_"
SUPER_GLUE_TFDS_VERSION = "1.0.2"
GLUE_TFDS_VERSION = "2.0.0"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One downstream task.

    Attributes:
      name: the registered name, e.g. "super_glue_rte".
      task: the short name the readers know, e.g. "rte".
      tfds_name: TFDS dataset the task reads when no data directory is set.
      format: the text-to-text preprocessor (see `formats`).
      postprocess: decoded string -> metric value (see `postprocessors`).
      metric_fns: `(targets, predictions) -> dict` (see `metrics`).
      labels: class label strings, or None for free-text targets (ReCoRD, WSC).
      splits, tfds_splits, train_filter: as `BenchmarkSource` takes them.
    """

    name: str
    task: str
    tfds_name: str
    format: Callable
    postprocess: Callable
    metric_fns: Sequence[Callable]
    labels: tuple[str, ...] | None
    splits: tuple[str, ...] = ("train", "validation", "test")
    tfds_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    train_filter: Callable | None = None
    # The T5 format's leading word and (name shown, row key) fields: what a template
    # (prompt_jax/methods/templates.py) names; empty for ReCoRD and WSC (no templates).
    benchmark: str = ""
    fields: tuple[tuple[str, str], ...] = ()


def _classification(name, task, tfds_name, benchmark, fields, labels, metric_fns, **kw) -> Spec:
    return Spec(
        name=name, task=task, tfds_name=tfds_name,
        format=formats.text_to_text(benchmark, fields, labels),
        postprocess=kw.pop("postprocess", postprocessors.class_id(labels)),
        metric_fns=metric_fns, labels=tuple(labels), benchmark=benchmark,
        fields=tuple(fields), **kw,
    )  # fmt: skip


def _super_glue(task: str, *args, **kw) -> Spec:
    tfds_name = f"super_glue/{task}:{SUPER_GLUE_TFDS_VERSION}"
    return _classification(f"super_glue_{task}", task, tfds_name, *args, **kw)


def _glue(task: str, *args, **kw) -> Spec:
    return _classification(f"glue_{task}", task, f"glue/{task}:{GLUE_TFDS_VERSION}", *args, **kw)


BOOL = ("False", "True")
NLI = ("entailment", "not_entailment")
# The diagnostics have one (labelled) file: read as `validation` and as `test`.
DIAGNOSTIC = {"splits": ("validation", "test"), "tfds_splits": {"validation": "test"}}
SORTED = formats.sorted_fields

SPECS: tuple[Spec, ...] = (
    _super_glue("boolq", "boolq", SORTED("question", "passage"), BOOL, [metrics.accuracy]),
    _super_glue("cb", "cb", SORTED("premise", "hypothesis"),
                ("entailment", "contradiction", "neutral"),
                [metrics.mean_3class_f1, metrics.accuracy]),
    _super_glue("copa", "copa", SORTED("premise", "choice1", "choice2", "question"),
                ("choice1", "choice2"), [metrics.accuracy]),
    _super_glue("multirc", "multirc", (("question", "question"), ("answer", "answer"),
                                       ("paragraph", "paragraph")),
                BOOL, [metrics.multirc_f1a, metrics.multirc_exact_match],
                postprocess=postprocessors.multirc),
    Spec("super_glue_record", "record", f"super_glue/record:{SUPER_GLUE_TFDS_VERSION}",
         formats.record, postprocessors.record, [metrics.record_f1_em], None),
    _super_glue("rte", "rte", SORTED("premise", "hypothesis"), NLI, [metrics.accuracy]),
    _super_glue("wic", "wic", (("sentence1", "sentence1"), ("sentence2", "sentence2"),
                               ("word", "word")), BOOL, [metrics.accuracy]),
    # T5's "simple" WSC: generate the referent; train on the true referents only.
    Spec("super_glue_wsc", "wsc", f"super_glue/wsc.fixed:{SUPER_GLUE_TFDS_VERSION}",
         formats.wsc_simple, postprocessors.wsc_simple, [metrics.accuracy], None,
         train_filter=lambda x: tf.equal(x["label"], 1)),
    # The diagnostics are cast as RTE; AX-b's sentence1/sentence2 are premise/hypothesis.
    _super_glue("axb", "rte", (("hypothesis", "sentence2"), ("premise", "sentence1")), NLI,
                [metrics.matthews_corrcoef], **DIAGNOSTIC),
    _super_glue("axg", "rte", SORTED("premise", "hypothesis"), NLI,
                [metrics.gender_parity, metrics.axg_accuracy],
                postprocess=postprocessors.axg, **DIAGNOSTIC),
    _glue("sst2", "sst2", (("sentence", "sentence"),), ("negative", "positive"),
          [metrics.accuracy]),
    _glue("mrpc", "mrpc", SORTED("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
          [metrics.f1_binary, metrics.accuracy]),
    _glue("qqp", "qqp", SORTED("question1", "question2"), ("not_duplicate", "duplicate"),
          [metrics.f1_binary, metrics.accuracy]),
)  # fmt: skip

# T5's SuperGLUE mixture rates: training examples per task (WSC: true referents only).
SUPER_GLUE_RATES = {
    "boolq": 9_427, "cb": 250, "copa": 400, "multirc": 27_243, "record": 138_854,
    "rte": 2_490, "wic": 5_428, "wsc": 259,
}  # fmt: skip
PRETRAINING_TASKS = ("span_corruption", "lm_adaptation", "bert_style")


def variant_name(task: str, *, taskless: bool = False, sentinel: bool = False) -> str:
    """`task`, `task_sentinel`, `taskless_task` or `taskless_task_sentinel`."""
    return (TASKLESS_PREFIX if taskless else "") + task + (SENTINEL_SUFFIX if sentinel else "")


def _add_task(name: str, **kwargs) -> None:
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)  # importing the package twice re-registers
    seqio.TaskRegistry.add(name, output_features=OUTPUT_FEATURES, **kwargs)


def _add_mixture(name: str, tasks: list[tuple[str, float]]) -> None:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(name, tasks)


def register() -> None:
    """Registers every task and mixture with seqio; reads nothing."""
    for spec in SPECS:
        source = BenchmarkSource(spec.task, spec.tfds_name, spec.splits, spec.tfds_splits,
                                 spec.train_filter)  # fmt: skip
        for taskless, sentinel in itertools.product((False, True), repeat=2):
            name = variant_name(spec.name, taskless=taskless, sentinel=sentinel)
            # The T5 format (+ remove_first_word), tokenized; or the task's template.
            steps = [templates.preprocessor(spec, name, taskless)]
            if sentinel:
                steps.append(formats.prepend_sentinel)
            _add_task(
                name,
                source=source,
                preprocessors=[*steps, seqio.preprocessors.append_eos_after_trim],
                postprocess_fn=postprocessors.strip_sentinel(spec.postprocess)
                if sentinel else spec.postprocess,
                metric_fns=list(spec.metric_fns),
            )  # fmt: skip
    for suffix in ("", SENTINEL_SUFFIX):
        _add_mixture(
            "super_glue" + suffix,
            [(f"super_glue_{t}{suffix}", rate) for t, rate in SUPER_GLUE_RATES.items()],
        )
    to_targets = seqio.utils.map_over_dataset(lambda x: {"targets": x["text"]})
    tokenize_text = functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False)
    objectives = (pretraining.span_corruption, pretraining.lm_adaptation,
                  pretraining.bert_style)
    for name, objective in zip(PRETRAINING_TASKS, objectives, strict=True):
        _add_task(
            name,
            source=TextSource(),
            preprocessors=[to_targets, tokenize_text, objective,
                           seqio.preprocessors.append_eos_after_trim],
            metric_fns=[],
        )  # fmt: skip


DOWNSTREAM_TASKS = tuple(s.name for s in SPECS)
TASK_NAMES = (
    DOWNSTREAM_TASKS + tuple(n + SENTINEL_SUFFIX for n in DOWNSTREAM_TASKS) + PRETRAINING_TASKS
)
# The taskless variants, kept out of TASK_NAMES (the T5-format and pretraining tasks).
TASKLESS_TASKS = tuple(
    variant_name(n, taskless=True, sentinel=sentinel)
    for sentinel in (False, True) for n in DOWNSTREAM_TASKS
)  # fmt: skip
MIXTURE_NAMES = ("super_glue", "super_glue" + SENTINEL_SUFFIX)
_SPECS_BY_NAME = {s.name: s for s in SPECS}


def class_labels(task_name: str) -> tuple[str, ...] | None:
    """The label strings of a classification task, in class-index order; None otherwise.

    `_sentinel` and `taskless_` variants give their base task's plain labels (without
    `<extra_id_0>`): the strings a prompt is initialized from. ReCoRD, WSC (free-text
    referents), the mixtures and the pretraining tasks give None; so does a task or mixture
    registered with seqio outside prompt_jax (a user's own: no labels known). Any other name
    raises, naming it.
    """
    base = task_name.removeprefix(TASKLESS_PREFIX).removesuffix(SENTINEL_SUFFIX)
    if base in _SPECS_BY_NAME:
        return _SPECS_BY_NAME[base].labels
    if task_name in PRETRAINING_TASKS or task_name in MIXTURE_NAMES:
        return None
    if task_name in seqio.TaskRegistry.names() or task_name in seqio.MixtureRegistry.names():
        return None
    known = TASK_NAMES + TASKLESS_TASKS + MIXTURE_NAMES
    raise ValueError(f"{task_name!r} is not a prompt_jax task; known: {known}")
