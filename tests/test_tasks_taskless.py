"""The `taskless_` variants: the base task's inputs without their first word, all else equal.

The prompt-tuning reference's `remove_first_text_token` (`prompt_tuning/data/
preprocessors.py`) removes everything up to and including the first space of the
rendered text; these tests check that, string for string, against the base tasks.
Each task reads its real file under ../shared/data where that holds the split, and the
hand-written official-format stand-in of tests/testdata/official otherwise.
"""

from __future__ import annotations

import functools
import pathlib

import pytest
import seqio
import tensorflow as tf
from conftest import REPO_ROOT, SHARED_DATA
from prompt_jax.tasks import config, formats, official

from prompt_jax import tasks

FIXTURES = REPO_ROOT / "tests" / "testdata" / "official"
TAKE = 64  # examples compared per task and split
# The first word of each task's rendered inputs, the word the taskless variant drops.
FIRST_WORD = {
    "super_glue_boolq": "boolq", "super_glue_cb": "cb", "super_glue_copa": "copa",
    "super_glue_multirc": "multirc", "super_glue_record": "record", "super_glue_rte": "rte",
    "super_glue_wic": "wic", "super_glue_wsc": "wsc:", "super_glue_axb": "rte",
    "super_glue_axg": "rte", "glue_sst2": "sst2", "glue_mrpc": "mrpc", "glue_qqp": "qqp",
}  # fmt: skip
SHORT = {spec.name: spec.task for spec in tasks.benchmarks.SPECS}


def _task_dir(root: pathlib.Path, task: str) -> pathlib.Path:
    if task in official.GLUE_DIRS:
        return root / "glue" / official.GLUE_DIRS[task]
    return root / "super_glue" / official.SUPER_GLUE_DIRS[task]


def _has(root: pathlib.Path, task: str, split: str) -> bool:
    try:
        official.official_file(str(root), task, split)
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    """Per task: the shared directory when it holds the validation split, else the fixture's."""
    root = tmp_path_factory.mktemp("data")
    for task in SHORT.values():
        source = SHARED_DATA if _has(SHARED_DATA, task, "validation") else FIXTURES
        if _has(source, task, "validation"):
            link = _task_dir(root, task)
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(_task_dir(source, task))
    return root


@pytest.fixture(autouse=True)
def _env(monkeypatch, data_dir):
    monkeypatch.delenv(config.VOCAB_ENV, raising=False)  # the package's own vocabulary
    monkeypatch.setenv(config.DATA_DIR_ENV, str(data_dir))
    monkeypatch.delenv(config.TEXT_FILES_ENV, raising=False)


@functools.cache
def _examples(name: str, split: str) -> tuple[dict, ...]:
    ds = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
    return tuple(ds.take(TAKE).as_numpy_iterator())


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _needs(data_dir: pathlib.Path, name: str, split: str) -> None:
    task = SHORT[name]
    if not _has(data_dir, task, split):
        pytest.skip(f"{name}: no {split} file for {task} under {SHARED_DATA} nor {FIXTURES}")


def _without_first_word(s: str) -> str:
    word, space, rest = s.partition(" ")
    assert space, f"no space in {s!r}"
    return rest


SPLITS = [(n, "validation") for n in tasks.DOWNSTREAM_TASKS] + [("super_glue_wsc", "train")]


@pytest.mark.parametrize("name,split", SPLITS)
@pytest.mark.parametrize("sentinel", [False, True], ids=["plain", "sentinel"])
def test_taskless_inputs_are_the_base_inputs_without_the_first_word(
    data_dir, name, split, sentinel
):
    _needs(data_dir, name, split)
    base = _examples(name, split)
    variant = tasks.benchmarks.variant_name(name, taskless=True, sentinel=sentinel)
    taskless = _examples(variant, split)
    assert len(taskless) == len(base) > 0
    vocab = tasks.get_vocabulary()
    sentinel_ids = [vocab.vocab_size - 1] if sentinel else []
    for ex_base, ex in zip(base, taskless, strict=True):
        inputs = _text(ex_base["inputs_pretokenized"])
        assert inputs.split(" ", 1)[0] == FIRST_WORD[name]
        assert _text(ex["inputs_pretokenized"]) == _without_first_word(inputs)
        assert list(ex["inputs"]) == vocab.encode(_without_first_word(inputs)) + [vocab.eos_id]
        assert ex["targets_pretokenized"] == ex_base["targets_pretokenized"]
        assert list(ex["targets"]) == sentinel_ids + list(ex_base["targets"])
        assert set(ex) == set(ex_base)
        for key in set(ex_base) - {"inputs", "inputs_pretokenized", "targets"}:
            assert str(ex[key]) == str(ex_base[key]), key  # idx, label, answers, …


# Rendered strings written out from the files, base and taskless.
EXACT = [
    ("super_glue_rte", 1,
     "hypothesis: Bacteria is winning the war against antibiotics. premise: Yet, we now are "
     "discovering that antibiotics are losing their effectiveness against illness. "
     "Disease-causing bacteria are mutating faster than we can come up with new antibiotics to "
     "fight the new variations.", "entailment"),
    ("super_glue_wsc", 5,
     "The large ball crashed right through the table because *it* was made of styrofoam.",
     "the table"),
]  # fmt: skip


@pytest.mark.parametrize("name,position,inputs,targets", EXACT)
def test_exact_taskless_strings(data_dir, name, position, inputs, targets):
    if not _has(SHARED_DATA, SHORT[name], "validation"):
        pytest.skip(f"{name}: the validation file is absent under {SHARED_DATA}")
    ex = _examples("taskless_" + name, "validation")[position]
    assert (_text(ex["inputs_pretokenized"]), _text(ex["targets_pretokenized"])) == (
        inputs,
        targets,
    )
    base = _examples(name, "validation")[position]
    assert _text(base["inputs_pretokenized"]) == f"{FIRST_WORD[name]} {inputs}"


def test_remove_first_word_is_the_references_regex():
    """Up to and including the first " " (not other whitespace), once; no space: unchanged."""
    cases = {
        "rte hypothesis: a premise: b": "hypothesis: a premise: b",
        "wsc: The *it* .": "The *it* .",
        "a  b": " b",
        "x\ty z": "z",
        "single": "single",
        " leading": "leading",
        "": "",
    }
    ds = tf.data.Dataset.from_tensor_slices({"inputs": list(cases), "targets": list(cases)})
    out = list(formats.remove_first_word(ds).as_numpy_iterator())
    assert [o["inputs"].decode() for o in out] == list(cases.values())
    assert [o["targets"].decode() for o in out] == list(cases)  # targets untouched


def test_registered_names():
    bases = tasks.DOWNSTREAM_TASKS
    expected = [f"taskless_{b}" for b in bases] + [f"taskless_{b}_sentinel" for b in bases]
    assert list(tasks.TASKLESS_TASKS) == expected
    assert "taskless_super_glue_rte" in expected and "taskless_glue_qqp_sentinel" in expected
    assert set(expected) <= set(seqio.TaskRegistry.names())
    assert not set(expected) & set(tasks.TASK_NAMES)


@pytest.mark.parametrize("name", tasks.DOWNSTREAM_TASKS)
def test_same_source_postprocessor_and_metrics(name):
    base = seqio.get_mixture_or_task(name)
    for sentinel in (False, True):
        same = seqio.get_mixture_or_task(tasks.benchmarks.variant_name(name, sentinel=sentinel))
        variant = seqio.get_mixture_or_task(
            tasks.benchmarks.variant_name(name, taskless=True, sentinel=sentinel)
        )
        assert variant.source is base.source
        assert variant.splits == base.splits
        assert variant.metric_fns == base.metric_fns
        assert variant.output_features == base.output_features
        # seqio keeps the function as given; the sentinel ones wrap it (checked on data below).
        if sentinel:
            assert variant._postprocess_fn is not base._postprocess_fn
        else:
            assert variant._postprocess_fn is base._postprocess_fn
        # Preprocessors: the sentinel-or-not twin's; the text step (the format, tokenized, or
        # a template: methods/templates.py) with remove_first_word after the format.
        steps, text = list(same.preprocessors), variant.preprocessors[0]
        assert (text.spec, text.taskless, steps[0].taskless) == (steps[0].spec, True, False)
        assert list(variant.preprocessors[1:]) == steps[1:]


def test_postprocess_through_the_taskless_sentinel_variant(data_dir):
    _needs(data_dir, "super_glue_cb", "validation")
    vocab = tasks.get_vocabulary()
    base = seqio.get_mixture_or_task("super_glue_cb")
    variant = seqio.get_mixture_or_task("taskless_super_glue_cb_sentinel")
    for ex_base, ex in zip(
        _examples("super_glue_cb", "validation"),
        _examples("taskless_super_glue_cb_sentinel", "validation"),
        strict=True,
    ):
        decoded = vocab.decode(list(ex["targets"]))
        assert decoded == "<extra_id_0> " + _text(ex["targets_pretokenized"])
        expected = base.postprocess_fn(_text(ex_base["targets_pretokenized"]), example=ex_base)
        assert variant.postprocess_fn(decoded, example=ex) == expected >= 0


@pytest.mark.parametrize("name", tasks.DOWNSTREAM_TASKS)
def test_class_labels(name):
    labels = tasks.class_labels(name)
    assert tasks.class_labels(f"taskless_{name}") == labels
    assert tasks.class_labels(f"taskless_{name}_sentinel") == labels
    with pytest.raises(ValueError, match="not a prompt_jax task"):
        tasks.class_labels(f"taskless_{name}_typo")


def test_class_labels_spelled_out():
    assert tasks.class_labels("taskless_super_glue_rte") == ("entailment", "not_entailment")
    assert tasks.class_labels("taskless_glue_sst2_sentinel") == ("negative", "positive")
    assert tasks.class_labels("taskless_super_glue_wsc") is None
    assert tasks.class_labels("taskless_super_glue_record_sentinel") is None
