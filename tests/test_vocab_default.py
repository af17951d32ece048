"""The vocabulary defaults to the package's own copy of T5's, so tasks read offline.

No `PROMPT_JAX_VOCAB`, no gin binding: `get_vocabulary()` is
`prompt_jax/demo_data/spiece.model`, the same bytes as ../shared/data/t5/spiece.model
(T5's `cc_all.32000`, see SOURCES.md); an unreadable vocabulary says "cannot read",
the path and the reason, on one line.
"""

from __future__ import annotations

import pathlib
import re

import gin
import pytest
import seqio
from conftest import REPO_ROOT, SHARED_DATA, shared_file
from prompt_jax.tasks import config

from prompt_jax import tasks

PACKAGE_VOCAB = REPO_ROOT / "prompt_jax" / "demo_data" / "spiece.model"
CANNOT_READ = "cannot read the SentencePiece vocabulary "


@pytest.fixture(autouse=True)
def _no_vocab_setting(monkeypatch):
    monkeypatch.delenv(config.VOCAB_ENV, raising=False)
    monkeypatch.delenv(config.TEXT_FILES_ENV, raising=False)
    monkeypatch.delenv(config.DATA_DIR_ENV, raising=False)


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message, message
    return message


def test_default_is_the_packages_copy():
    assert config.data_paths()["vocab"] is None
    path = pathlib.Path(config.vocab_path())
    assert "://" not in str(path)
    assert path.resolve() == PACKAGE_VOCAB.resolve()
    vocab = tasks.get_vocabulary()
    assert pathlib.Path(vocab.sentencepiece_model_file).resolve() == PACKAGE_VOCAB.resolve()
    assert vocab.vocab_size == 32100 and vocab.decode([32099]) == "<extra_id_0>"


def test_the_packages_copy_is_t5s_vocabulary():
    shared = shared_file("t5", "spiece.model")
    assert PACKAGE_VOCAB.read_bytes() == shared.read_bytes()


def test_a_task_reads_offline_with_nothing_configured(monkeypatch):
    """Local official files, no vocabulary setting: the tokens are the shared model's."""
    shared_file("super_glue", "RTE", "val.jsonl")
    monkeypatch.setenv(config.DATA_DIR_ENV, str(SHARED_DATA))
    task = seqio.get_mixture_or_task("super_glue_rte")
    ex = next(task.get_dataset(None, split="validation", shuffle=False).as_numpy_iterator())
    assert (
        ex["inputs_pretokenized"]
        .decode()
        .startswith("rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve,")
    )
    reference = seqio.SentencePieceVocabulary(str(SHARED_DATA / "t5" / "spiece.model"), 100)
    assert list(ex["inputs"]) == reference.encode(ex["inputs_pretokenized"].decode()) + [1]
    assert list(ex["targets"]) == reference.encode("not_entailment") + [1]


def test_environment_and_gin_replace_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(config.VOCAB_ENV, "/from/env.model")
    assert config.vocab_path() == "/from/env.model"
    key = "prompt_jax.tasks.data_paths.vocab"
    with gin.unlock_config():
        gin.bind_parameter(key, "gs://from/gin.model")
    try:
        assert config.vocab_path() == "gs://from/gin.model"
    finally:
        with gin.unlock_config():
            gin.bind_parameter(key, None)
    monkeypatch.delenv(config.VOCAB_ENV)
    assert pathlib.Path(config.vocab_path()).resolve() == PACKAGE_VOCAB.resolve()


def test_missing_file(tmp_path):
    path = tmp_path / "spm.model"
    with pytest.raises(FileNotFoundError) as e:
        tasks.get_vocabulary(str(path))
    assert _one_line(e).startswith(
        f"{CANNOT_READ}{path}: no SentencePiece model there (no such file;"
    )
    assert config.VOCAB_ENV in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        tasks.get_vocabulary(str(tmp_path))
    assert _one_line(e).startswith(
        f"{CANNOT_READ}{tmp_path}: no SentencePiece model there (a directory;"
    )


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "vocab.model"
    path.write_text("not a model\nsecond line\n")
    with pytest.raises(ValueError) as e:
        tasks.get_vocabulary(str(path))
    assert re.match(rf"{re.escape(CANNOT_READ + str(path))}: not a SentencePiece model \(\w+: ",
                    _one_line(e)), str(e.value)  # fmt: skip


def test_remote_path_that_cannot_be_read():
    path = "nosuchscheme://bucket/sentencepiece.model"
    with pytest.raises(ValueError) as e:
        tasks.get_vocabulary(path)
    message = _one_line(e)
    assert message.startswith(f"{CANNOT_READ}{path}: UnimplementedError: ")
    assert "not a SentencePiece model" not in message  # a read failure, not a bad file


def test_a_task_names_the_configured_bad_vocabulary(monkeypatch, tmp_path):
    path = tmp_path / "junk.model"
    path.write_bytes(b"\x00junk")
    monkeypatch.setenv(config.VOCAB_ENV, str(path))
    feature = seqio.get_mixture_or_task("taskless_super_glue_rte").output_features["inputs"]
    with pytest.raises(ValueError, match=re.escape(f"{CANNOT_READ}{path}: ")):
        feature.vocabulary.encode("resolved now")
