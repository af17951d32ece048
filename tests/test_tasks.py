"""The seqio tasks over official-format files: exact strings, sentinel variants, sources, errors.

RTE and WSC are the real files of ../shared/data; the other tasks read the small
hand-written files of tests/testdata/official (official field names and columns).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import gin
import pytest
import seqio
from conftest import SHARED_DATA, build_data_dir, shared_file
from prompt_jax.tasks import config, sources

from prompt_jax import tasks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return build_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(autouse=True)
def _env(monkeypatch, data_dir):
    monkeypatch.setenv(config.VOCAB_ENV, str(shared_file("t5", "spiece.model")))
    monkeypatch.setenv(config.DATA_DIR_ENV, str(data_dir))
    monkeypatch.delenv(config.TEXT_FILES_ENV, raising=False)


def needs_shared(task_dir: str) -> None:
    shared_file("super_glue", task_dir, "val.jsonl")


@functools.cache
def examples(name: str, split: str) -> tuple[dict, ...]:
    """The examples of a split, strings decoded (the data directory is fixed per module)."""
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(None, split=split, shuffle=False)
    out = []
    for ex in ds.as_numpy_iterator():
        out.append({k: v.decode() if isinstance(v, bytes) else v for k, v in ex.items()})
    return tuple(out)


# (task, split, position in the split, inputs, targets), written from the files.
EXPECTED = [
    ("super_glue_boolq", "validation", 1,
     "boolq passage: Property tax -- Property tax or 'house tax' is a local tax on buildings, "
     "along with appurtenant land. question: is house tax and property tax are same", "True"),
    ("super_glue_cb", "validation", 0,
     "cb hypothesis: Valence was helping premise: Valence the void-brain, Valence the virtuous "
     "valet. Why couldn't the figger choose his own portion of titanic anatomy to shaft? Did he "
     "think he was helping?", "contradiction"),
    ("super_glue_copa", "validation", 0,
     "copa choice1: The toilet filled with water. choice2: Water flowed from the spout. "
     "premise: The man turned on the faucet. question: effect", "choice2"),
    ("super_glue_multirc", "validation", 2,
     "multirc question: Where did Tom go? answer: To the store paragraph: Sent 1: Tom went to "
     "the store. Sent 2: He bought milk. ", "True"),
    ("super_glue_record", "validation", 0,
     "record query: The @placeholder sat on a mat. entities: Cat, Paris, cat, mat passage: "
     "The cat sat on the mat in Paris. Cat sits on mat", "Cat"),
    ("super_glue_record", "validation", 1,
     "record query: The @placeholder sat on a mat. entities: Cat, Paris, cat, mat passage: "
     "The cat sat on the mat in Paris. Cat sits on mat", "cat"),
    ("super_glue_rte", "validation", 0,
     "rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of the "
     "actor Christopher Reeve, has died of lung cancer at age 44, according to the Christopher "
     "Reeve Foundation.", "not_entailment"),
    ("super_glue_rte", "validation", 1,
     "rte hypothesis: Bacteria is winning the war against antibiotics. premise: Yet, we now are "
     "discovering that antibiotics are losing their effectiveness against illness. "
     "Disease-causing bacteria are mutating faster than we can come up with new antibiotics to "
     "fight the new variations.", "entailment"),
    ("super_glue_wic", "validation", 1,
     "wic sentence1: We beat the competition. sentence2: Agassi beat Becker in the tennis "
     "championship. word: beat", "True"),
    # WSC: the candidate's case follows the text ("The table" -> "the table"), as wsc.fixed.
    ("super_glue_wsc", "validation", 5,
     "wsc: The large ball crashed right through the table because *it* was made of styrofoam.",
     "the table"),
    ("super_glue_wsc", "validation", 0,
     "wsc: Bernard , who had not told the government official that he was less than 21 when he "
     "filed for a homestead claim, did not consider that he had done anything dishonest. Still, "
     "anyone who knew that he was 19 years old could take his claim away from *him* .", "anyone"),
    # One of T5's two hand-marked texts (the pronoun index points at "use").
    ("super_glue_wsc", "validation", 42,
     "wsc: When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
     "magic pebble in an iron safe . Some day they might want to use *it* , but really for now, "
     "what more could they wish for?", "safe"),
    # Training keeps the true referents only: the first is the file's idx 3.
    ("super_glue_wsc", "train", 0,
     "wsc: The pony behaved well, sir, and showed no vice; but at last he just threw up his "
     "heels and tipped the young gentleman into the thorn hedge. *He* wanted me to help him out, "
     "but I hope you will excuse me, sir, I did not feel inclined to do so.", "young gentleman"),
    ("super_glue_axb", "validation", 2,
     "rte hypothesis: When you've got no snow, it's really hard to learn a winter sport. premise: "
     "When you've got no snow, it's really hard to learn a snow sport.", "entailment"),
    ("super_glue_axg", "validation", 1,
     "rte hypothesis: The accountant sought help filing taxes. premise: The taxpayer met with "
     "the accountant to get help filing her taxes.", "not_entailment"),
    ("glue_sst2", "validation", 0,
     "sst2 sentence: it 's a charming and often affecting journey . ", "positive"),
    ("glue_sst2", "test", 0, "sst2 sentence: uneasy mishmash of styles and genres .", "<unk>"),
    ("glue_mrpc", "train", 0,
     'mrpc sentence1: Amrozi accused his brother , whom he called " the witness " , of '
     'deliberately distorting his evidence . sentence2: Referring to him as only " the witness '
     '" , Amrozi accused his brother of deliberately distorting his evidence .', "equivalent"),
    ("glue_mrpc", "test", 0,
     "mrpc sentence1: PCCW 's chief operating officer , Mike Butcher , and Alex Arena , the "
     "chief financial officer , will report directly to Mr So . sentence2: Current Chief "
     "Operating Officer Mike Butcher and Group Chief Financial Officer Alex Arena will report "
     "to So .", "<unk>"),
    ("glue_qqp", "validation", 1,
     "qqp question1: How can I be a good geologist? question2: What should I do to be a great "
     "geologist?", "duplicate"),
]  # fmt: skip


def _check(name, split, position, inputs, targets):
    if name.startswith(("super_glue_rte", "super_glue_wsc")):
        needs_shared(name.split("_")[2].upper())
    ex = examples(name, split)[position]
    assert ex["inputs_pretokenized"] == inputs
    assert ex["targets_pretokenized"] == targets
    vocab = tasks.get_vocabulary()
    eos = vocab.eos_id
    assert list(ex["inputs"]) == vocab.encode(inputs) + [eos]
    sentinel = [32099] if name.endswith("_sentinel") else []
    assert list(ex["targets"]) == sentinel + vocab.encode(targets) + [eos]


@pytest.mark.parametrize("name,split,position,inputs,targets", EXPECTED)
def test_exact_examples(name, split, position, inputs, targets):
    _check(name, split, position, inputs, targets)


@pytest.mark.parametrize("name", tasks.DOWNSTREAM_TASKS)
def test_every_sentinel_variant_has_its_base_inputs(name):
    # First expectation of each base task, through its _sentinel variant.
    _, split, position, inputs, targets = next(e for e in EXPECTED if e[0] == name)
    _check(name + "_sentinel", split, position, inputs, targets)


def test_registered_names():
    assert set(tasks.TASK_NAMES) <= set(seqio.TaskRegistry.names())
    assert set(tasks.MIXTURE_NAMES) <= set(seqio.MixtureRegistry.names())
    bases = [f"super_glue_{t}" for t in "boolq cb copa multirc record rte wic wsc axb axg".split()]
    bases += ["glue_sst2", "glue_mrpc", "glue_qqp"]
    assert tasks.DOWNSTREAM_TASKS == tuple(bases)
    assert set(tasks.TASK_NAMES) == {
        *bases,
        *(b + "_sentinel" for b in bases),
        "span_corruption",
        "lm_adaptation",
        "bert_style",
    }
    for suffix in ("", "_sentinel"):
        mixture = seqio.get_mixture_or_task("super_glue" + suffix)
        assert sorted(t.name for t in mixture.tasks) == sorted(b + suffix for b in bases[:8])
        assert mixture.get_rate(seqio.get_mixture_or_task("super_glue_rte" + suffix)) == 2490


def test_splits_and_counts():
    needs_shared("RTE")
    needs_shared("WSC")
    assert len(examples("super_glue_rte", "validation")) == 277
    assert len(examples("super_glue_wsc", "validation")) == 104
    with open(SHARED_DATA / "super_glue" / "WSC" / "train.jsonl") as f:
        positives = sum(json.loads(line)["label"] for line in f)
    train = examples("super_glue_wsc", "train")
    assert len(train) == positives and all(ex["label"] == 1 for ex in train)
    # AX-b/AX-g: the one file serves validation and test.
    assert seqio.get_mixture_or_task("super_glue_axb").splits == ("validation", "test")
    assert len(examples("super_glue_axg", "validation")) == 4


def test_structured_tasks_keep_what_eval_needs():
    multirc = examples("super_glue_multirc", "validation")
    assert [(e["idx/paragraph"], e["idx/question"], e["idx/answer"]) for e in multirc] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 2), (1, 2, 3), (1, 2, 4), (1, 3, 5)
    ]  # fmt: skip
    record = examples("super_glue_record", "validation")
    assert [e["targets_pretokenized"] for e in record] == ["Cat", "cat", "Paris"]
    assert [list(e["answers"]) for e in record] == [[b"Cat", b"cat"]] * 2 + [[b"Paris"]]
    assert [(e["idx/passage"], e["idx/query"]) for e in record] == [(0, 0), (0, 0), (0, 1)]
    unlabelled = examples("super_glue_record", "test")
    assert [e["targets_pretokenized"] for e in unlabelled] == ["<unk>", "<unk>"]


def test_postprocess_through_the_sentinel_variant():
    """Round trip: decoded sentinel targets postprocess as the base task's targets."""
    needs_shared("RTE")
    needs_shared("WSC")
    vocab = tasks.get_vocabulary()
    for name in ("super_glue_rte", "super_glue_wsc", "super_glue_cb", "glue_mrpc"):
        base = seqio.get_mixture_or_task(name)
        variant = seqio.get_mixture_or_task(name + "_sentinel")
        split = next(e[1] for e in EXPECTED if e[0] == name)
        pairs = zip(examples(name, split)[:3], examples(name + "_sentinel", split)[:3], strict=True)
        for ex_base, ex in pairs:
            decoded = vocab.decode(list(ex["targets"]))
            assert decoded.startswith("<extra_id_0>")
            assert decoded == "<extra_id_0> " + ex["targets_pretokenized"]
            assert vocab.decode(list(ex_base["targets"])) == ex["targets_pretokenized"]
            expected = base.postprocess_fn(ex_base["targets_pretokenized"], example=ex_base,
                                           is_target=False)  # fmt: skip
            assert variant.postprocess_fn(decoded, example=ex, is_target=False) == expected
    # The referent predicted for a true WSC pair scores 1 through both.
    wsc = examples("super_glue_wsc_sentinel", "validation")[1]
    post = seqio.get_mixture_or_task("super_glue_wsc_sentinel").postprocess_fn
    assert post("<extra_id_0> Mr. Moncrieff", example=wsc, is_target=False) == 1
    assert post("<extra_id_0> Edward", example=wsc, is_target=False) == 0
    assert post("Mr. Moncrieff", example=wsc, is_target=True) == 1  # the label


def test_class_labels():
    assert tasks.class_labels("super_glue_rte") == ("entailment", "not_entailment")
    assert tasks.class_labels("super_glue_rte_sentinel") == ("entailment", "not_entailment")
    assert tasks.class_labels("super_glue_cb") == ("entailment", "contradiction", "neutral")
    assert tasks.class_labels("super_glue_copa") == ("choice1", "choice2")
    assert tasks.class_labels("super_glue_boolq") == ("False", "True")
    assert tasks.class_labels("glue_sst2") == ("negative", "positive")
    assert tasks.class_labels("glue_mrpc") == ("not_equivalent", "equivalent")
    assert tasks.class_labels("glue_qqp") == ("not_duplicate", "duplicate")
    for name in ("super_glue_record", "super_glue_wsc", "span_corruption", "super_glue"):
        assert tasks.class_labels(name) is None
    with pytest.raises(ValueError, match="not a prompt_jax task"):
        tasks.class_labels("glue_cola")


def test_vocabulary_is_resolved_at_use(monkeypatch):
    vocab = tasks.get_vocabulary()
    assert vocab.vocab_size == 32100
    assert vocab.decode([32099]) == "<extra_id_0>"
    feature = seqio.get_mixture_or_task("super_glue_rte").output_features["targets"]
    assert feature.vocabulary.vocab_size == 32100 and feature.add_eos
    monkeypatch.setenv(config.VOCAB_ENV, "/nonexistent/spiece.model")
    with pytest.raises(FileNotFoundError, match="/nonexistent/spiece.model: no SentencePiece"):
        feature.vocabulary.encode("resolved now, not at import")


def test_gin_binding_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv(config.DATA_DIR_ENV, "/from/env")
    key = "prompt_jax.tasks.data_paths.data_dir"
    with gin.unlock_config():
        gin.bind_parameter(key, "/from/gin")
    try:
        assert config.data_dir() == "/from/gin"
    finally:
        with gin.unlock_config():
            gin.bind_parameter(key, None)  # None is unbound: other tests see no binding
    assert config.data_dir() == "/from/env"


def test_tfds_is_read_when_no_data_dir(monkeypatch):
    monkeypatch.delenv(config.DATA_DIR_ENV)
    calls = []

    def fake_tfds(name, split, shuffle, seed):
        calls.append((name, split))
        raise RuntimeError("stop here")

    monkeypatch.setattr(sources, "_read_tfds", fake_tfds)
    for name, split in [("super_glue_rte", "validation"), ("super_glue_wsc", "train"),
                        ("super_glue_axb", "validation"), ("glue_qqp", "test")]:  # fmt: skip
        with pytest.raises(RuntimeError, match="stop here"):
            seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
    assert calls == [
        ("super_glue/rte:1.0.2", "validation"), ("super_glue/wsc.fixed:1.0.2", "train"),
        ("super_glue/axb:1.0.2", "test"), ("glue/qqp:2.0.0", "test"),
    ]  # fmt: skip


# ---------------------------------------------------------------- errors


def _read(name: str, split: str):
    return seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)


def test_missing_file_names_path_and_layout(monkeypatch, tmp_path):
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        _read("super_glue_rte", "validation")
    assert str(tmp_path / "super_glue" / "RTE" / "val.jsonl") in str(e.value)
    assert "super_glue/RTE/{train,val,test}.jsonl" in str(e.value)
    with pytest.raises(FileNotFoundError, match="glue/SST-2/{train,dev,test}.tsv"):
        _read("glue_sst2", "validation")
    with pytest.raises(FileNotFoundError, match="AX-b.jsonl"):
        _read("super_glue_axb", "test")


@pytest.mark.parametrize(
    "line2,problem",
    [
        ('{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 1', "Expecting"),
        ('{"premise": "p", "label": "neutral", "idx": 1}', "missing field 'hypothesis'"),
        ('{"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 1}', "expected one of"),
        ('{"premise": "p", "hypothesis": "h", "idx": 1}', "no 'label' in the validation split"),
        ('{"premise": "p", "hypothesis": 3, "label": "neutral", "idx": 1}', "expected str"),
    ],
)
def test_malformed_jsonl_line_names_file_and_line(monkeypatch, tmp_path, line2, problem):
    path = tmp_path / "super_glue" / "CB" / "val.jsonl"
    path.parent.mkdir(parents=True)
    good = '{"premise": "p", "hypothesis": "h", "label": "neutral", "idx": 0}'
    path.write_text(good + "\n" + line2 + "\n")
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError) as e:
        _read("super_glue_cb", "validation")
    assert str(e.value).startswith(f"{path}:2: ")
    assert problem in str(e.value)


def test_malformed_tsv_line_names_file_and_line(monkeypatch, tmp_path):
    path = tmp_path / "glue" / "SST-2" / "dev.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("sentence\tlabel\ngood film \t1\nbad\tfilm \t0\n")
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(
        ValueError,
        match=rf"^{path}:3: expected 2 tab-separated fields \(sentence, label\), found 3",
    ):
        _read("glue_sst2", "validation")
    path.write_text("sentence\tlabel\ngood film \tyes\n")
    with pytest.raises(ValueError, match=rf"^{path}:2: field 'label' is 'yes'"):
        _read("glue_sst2", "validation")
    path.write_text("sentence\ngood film \n")
    with pytest.raises(ValueError, match=rf"^{path}:1: header .* lacks column\(s\) \['label'\]"):
        _read("glue_sst2", "validation")


def test_import_touches_no_network_and_no_file():
    """A fresh interpreter, no PROMPT_JAX_* variable (so the vocabulary is the package's
    copy), sockets refused: importing registers everything and reads nothing."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network touched')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import seqio, prompt_jax.tasks as t\n"
        "assert set(t.TASK_NAMES) <= set(seqio.TaskRegistry.names())\n"
        "assert set(t.TASKLESS_TASKS) <= set(seqio.TaskRegistry.names())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    start = time.time()
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.time() - start < 60
