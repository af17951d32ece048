"""Where the tasks find their data and vocabulary, resolved when a dataset is read.

Each setting is looked up, in order, in the gin binding of `data_paths`, then in
an environment variable, then a default; nothing is resolved at import, so the
settings may change after `import prompt_jax.tasks`.

| setting | gin | environment variable | default |
| --- | --- | --- | --- |
| official files | `data_paths.data_dir` | `PROMPT_JAX_DATA_DIR` | none: read TFDS |
| pretraining text | `data_paths.text_files` | `PROMPT_JAX_TEXT_FILES` | none: TFDS `c4/en` |
| vocabulary | `data_paths.vocab` | `PROMPT_JAX_VOCAB` | `prompt_jax/demo_data/spiece.model` |

The default vocabulary is the package's own copy of T5's `cc_all.32000` SentencePiece
model (32,000 pieces; T5's tasks read it from
`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model` and add 100 extra ids, as here),
so tasks read offline. A `gs://…` or other path is read only when configured. A
vocabulary that cannot be read raises one line: "cannot read the SentencePiece
vocabulary <path>: <reason>".
"""

from __future__ import annotations

import functools
import importlib.resources
import os

import gin
import seqio
import tensorflow as tf

DATA_DIR_ENV = "PROMPT_JAX_DATA_DIR"
TEXT_FILES_ENV = "PROMPT_JAX_TEXT_FILES"
VOCAB_ENV = "PROMPT_JAX_VOCAB"
EXTRA_IDS = 100


@gin.configurable(module="prompt_jax.tasks")
def data_paths(
    data_dir: str | None = None, text_files: str | None = None, vocab: str | None = None
) -> dict[str, str | None]:
    """The gin-bound settings (None where unbound); see the module docstring."""
    return {"data_dir": data_dir, "text_files": text_files, "vocab": vocab}


def _setting(name: str, env: str) -> str | None:
    return data_paths()[name] or os.environ.get(env) or None


def data_dir() -> str | None:
    """The directory of official files (`super_glue/<TASK>/…`, `glue/<TASK>/…`), or None."""
    return _setting("data_dir", DATA_DIR_ENV)


def text_files() -> str | None:
    """The pretraining text spec (globs, comma-separated, or `superglue_glue_train`), or None."""
    return _setting("text_files", TEXT_FILES_ENV)


def default_vocab() -> str:
    """The T5 vocabulary shipped with the package: `prompt_jax/demo_data/spiece.model`."""
    return str(importlib.resources.files("prompt_jax").joinpath("demo_data", "spiece.model"))


def vocab_path() -> str:
    """The SentencePiece model in use: gin, then `PROMPT_JAX_VOCAB`, then `default_vocab()`."""
    return _setting("vocab", VOCAB_ENV) or default_vocab()


def _cannot_read(path: str, reason: str) -> str:
    return f"cannot read the SentencePiece vocabulary {path}: {reason}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else 'no detail'}"


@functools.lru_cache(maxsize=4)
def _load_vocabulary(path: str) -> seqio.SentencePieceVocabulary:
    vocab = seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)
    try:
        _ = vocab.tokenizer  # seqio loads lazily; load now so a bad file is named here
    except tf.errors.OpError as e:  # the bytes could not be read (gfile: network, scheme, …)
        raise ValueError(_cannot_read(path, _first_line(e))) from None
    except Exception as e:  # protobuf DecodeError / sentencepiece RuntimeError on other bytes
        raise ValueError(
            _cannot_read(path, f"not a SentencePiece model ({_first_line(e)})")
        ) from None
    return vocab


def get_vocabulary(path: str | None = None) -> seqio.SentencePieceVocabulary:
    """T5's SentencePiece vocabulary with 100 extra ids (V = 32100, `<extra_id_0>` = 32099).

    Raises:
      FileNotFoundError: a local `path` that is no file.
      ValueError: a file (or remote path) that cannot be read or is not a model.
    """
    path = path or vocab_path()
    if "://" not in path and not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no such file"
        raise FileNotFoundError(_cannot_read(
            path, f"no SentencePiece model there ({what}; set {VOCAB_ENV} or gin "
                  f"data_paths.vocab, or leave both unset for the package's own copy)"
        ))  # fmt: skip
    return _load_vocabulary(path)


class LazyVocabulary(seqio.Vocabulary):
    """Stands for `get_vocabulary()` in the registered output features.

    Tasks are registered at import, before the vocabulary path may be known; every
    call here resolves the path then, so `PROMPT_JAX_VOCAB` may be set after import.
    """

    def __init__(self):
        super().__init__(extra_ids=EXTRA_IDS)

    @property
    def _vocab(self) -> seqio.SentencePieceVocabulary:
        return get_vocabulary()

    @property
    def eos_id(self) -> int:
        return self._vocab.eos_id

    @property
    def unk_id(self) -> int:
        return self._vocab.unk_id

    @property
    def pad_id(self) -> int:
        return self._vocab.pad_id

    @property
    def _base_vocab_size(self) -> int:
        return self._vocab._base_vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab.vocab_size

    def _encode(self, s):
        return self._vocab._encode(s)

    def _decode(self, ids):
        return self._vocab._decode(ids)

    def _encode_tf(self, s):
        return self._vocab._encode_tf(s)

    def _decode_tf(self, ids):
        return self._vocab._decode_tf(ids)

    def encode(self, s):
        return self._vocab.encode(s)

    def decode(self, ids):
        return self._vocab.decode(ids)

    def encode_tf(self, s):
        return self._vocab.encode_tf(s)

    def decode_tf(self, ids):
        return self._vocab.decode_tf(ids)

    def __eq__(self, other) -> bool:
        # Equal without loading anything: every instance resolves to the same vocabulary.
        return isinstance(other, LazyVocabulary)

    def __hash__(self) -> int:
        return hash(LazyVocabulary)

    def __str__(self) -> str:
        return f"LazyVocabulary(path={vocab_path()!r}, extra_ids={EXTRA_IDS})"


VOCABULARY = LazyVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}
