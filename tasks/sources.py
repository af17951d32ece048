"""seqio data sources that pick TFDS or local files when a dataset is read, not at import.

`BenchmarkSource`: the official SuperGLUE/GLUE files under the data directory when
one is set (`PROMPT_JAX_DATA_DIR` or gin `data_paths.data_dir`), TFDS otherwise.
`TextSource`: documents for the pretraining objectives, from local text files,
from Project Gutenberg books, from the text fields of the local SuperGLUE/GLUE training
files, or TFDS C4.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf
from prompt_jax.tasks import config, official

C4_TFDS_NAME = "c4/en:3.1.0"
# The value of PROMPT_JAX_TEXT_FILES that selects the training files' text fields.
TRAINING_TEXTS = "superglue_glue_train"
# The value that selects Project Gutenberg books: `gutenberg` reads
# <data_dir>/text/gutenberg/*/*.txt, `gutenberg:<dir>` reads <dir>/*/*.txt.
GUTENBERG = "gutenberg"
# Gutenberg documents: runs of consecutive paragraphs of at least this many characters.
GUTENBERG_DOCUMENT_CHARS = 2000
# Local text is split deterministically: a document whose fingerprint falls in
# bucket 0 of VALIDATION_BUCKETS (about 1 in 20) is held out for validation.
VALIDATION_BUCKETS = 20


class BenchmarkSource(seqio.DataSource):
    """One SuperGLUE/GLUE task, from official files or TFDS (see the module docstring).

    Args:
      task: short name, e.g. "rte" (a key of `official.ROW_SPECS`).
      tfds_name: e.g. "super_glue/rte:1.0.2".
      splits: the seqio splits offered.
      tfds_splits: seqio split -> TFDS split where they differ (AX-b's `validation` is `test`).
      train_filter: keeps a training row when true (T5 trains WSC on correct referents only).
    """

    def __init__(
        self,
        task: str,
        tfds_name: str,
        splits: Sequence[str] = official.SPLITS,
        tfds_splits: Mapping[str, str] | None = None,
        train_filter: Callable[[dict], tf.Tensor] | None = None,
    ):
        super().__init__(splits=splits)
        self.task, self.tfds_name = task, tfds_name
        self._tfds_splits = dict(tfds_splits or {})
        self._train_filter = train_filter

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return [f"{self.task}:{split}"]  # one shard: seqio shards the examples instead

    def __repr__(self) -> str:
        return f"BenchmarkSource({self.task!r}, tfds_name={self.tfds_name!r})"

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split not in self.splits:
            raise ValueError(f"{self.task}: no split {split!r}; it has {list(self.splits)}")
        directory = config.data_dir()
        if directory:
            rows = official.read_rows(directory, self.task, split)
            ds = official.rows_to_dataset(rows, self.task)
            if shuffle:
                ds = ds.shuffle(max(len(rows), 1), seed=seed)
        else:
            ds = _read_tfds(self.tfds_name, self._tfds_splits.get(split, split), shuffle, seed)
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        if split == "train" and self._train_filter is not None:
            ds = ds.filter(self._train_filter)
        return ds


class TextSource(seqio.DataSource):
    """Documents `{"text": …}` for span corruption and LM adaptation.

    `PROMPT_JAX_TEXT_FILES` (or gin `data_paths.text_files`) selects:
      - unset: TFDS `c4/en` (its own train/validation splits);
      - globs, comma-separated: one document per non-empty line of the files;
      - `superglue_glue_train`: the text fields (passages, sentences, questions,
        answers) of the SuperGLUE/GLUE training files under the data directory;
      - `gutenberg` or `gutenberg:<dir>`: Project Gutenberg books (`gutenberg_documents`).
    Local documents go to `validation` when their fingerprint
    (`tf.strings.to_hash_bucket_fast`, deterministic) lands in bucket 0 of 20; Gutenberg
    holds out whole books instead (`gutenberg_validation`).
    """

    def __init__(self):
        super().__init__(splits=("train", "validation"))

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        return [f"text:{split}"]

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split not in self.splits:
            raise ValueError(f"text source: no split {split!r}; it has {list(self.splits)}")
        spec = config.text_files()
        if spec is None:
            ds = _read_tfds(C4_TFDS_NAME, split, shuffle, seed)
            ds = ds.map(lambda x: {"text": x["text"]})
        else:
            if spec == GUTENBERG or spec.startswith(GUTENBERG + ":"):
                directory = spec[len(GUTENBERG) + 1:] or _gutenberg_dir()
                ds = tf.data.Dataset.from_tensor_slices(tf.constant(
                    gutenberg_documents(directory, split), tf.string))
            else:
                if spec == TRAINING_TEXTS:
                    ds = tf.data.Dataset.from_tensor_slices(
                        tf.constant(training_texts(config.data_dir()), tf.string)
                    )
                else:
                    ds = tf.data.TextLineDataset(_glob_text_files(spec))
                    ds = ds.filter(lambda line: tf.strings.length(tf.strings.strip(line)) > 0)
                held_out = lambda t: tf.equal(
                    tf.strings.to_hash_bucket_fast(t, VALIDATION_BUCKETS), 0)
                ds = ds.filter(held_out if split == "validation" else lambda t: ~held_out(t))
            ds = ds.map(lambda t: {"text": t})
            if shuffle:
                ds = ds.shuffle(10_000, seed=seed)
        if shard_info and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        return ds


def _read_tfds(name: str, split: str, shuffle: bool, seed: int | None) -> tf.data.Dataset:
    try:
        return seqio.TfdsDataSource(tfds_name=name).get_dataset(split, shuffle=shuffle, seed=seed)
    except Exception as e:  # TFDS raises many kinds; the hint is the same for all
        raise RuntimeError(
            f"TFDS {name!r} split {split!r} could not be read ({type(e).__name__}: {e}). "
            f"Prepare it with TFDS, or set {config.DATA_DIR_ENV} (official files) / "
            f"{config.TEXT_FILES_ENV} (pretraining text)"
        ) from e


def _glob_text_files(spec: str) -> list[str]:
    files = []
    for pattern in (p.strip() for p in spec.split(",") if p.strip()):
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise FileNotFoundError(f"{pattern}: no file matches ({config.TEXT_FILES_ENV})")
        files.extend(matches)
    return files


_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE)
_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", re.MULTILINE)


def _gutenberg_dir() -> str:
    data_dir = config.data_dir()
    if not data_dir:
        raise ValueError(
            f"{config.TEXT_FILES_ENV}={GUTENBERG} reads <data_dir>/text/gutenberg, but "
            f"{config.DATA_DIR_ENV} (or gin data_paths.data_dir) is unset; or give the "
            f"directory: {GUTENBERG}:<dir>"
        )
    return os.path.join(data_dir, "text", "gutenberg")


def gutenberg_books(directory: str) -> list[str]:
    """The books under `directory` (`<Author>/<Title>.txt`), relative paths, sorted."""
    books = sorted(os.path.relpath(p, directory)
                   for p in tf.io.gfile.glob(os.path.join(directory, "*", "*.txt")))
    if not books:
        raise FileNotFoundError(f"{directory}: no Gutenberg book (expected <Author>/<Title>.txt)")
    return books


def gutenberg_validation(book: str) -> bool:
    """Whether a book (its relative path) is held out: bucket 0 of 20 of its md5, so whole
    books, about one in twenty, never trained on; the same on every machine."""
    digest = hashlib.md5(book.replace(os.sep, "/").encode()).digest()
    return int.from_bytes(digest[:8], "little") % VALIDATION_BUCKETS == 0


def gutenberg_body(text: str, path: str) -> str:
    """What lies between a Project Gutenberg file's `*** START OF` and `*** END OF` lines."""
    starts, ends = list(_START.finditer(text)), list(_END.finditer(text))
    if len(starts) != 1 or len(ends) != 1 or ends[0].start() < starts[0].end():
        raise ValueError(
            f"{path}: expected one '*** START OF ... PROJECT GUTENBERG' line followed by one "
            f"'*** END OF ...' line, found {len(starts)} start and {len(ends)} end lines"
        )
    body = text[starts[0].end():ends[0].start()]
    return body.split("\n", 1)[1] if "\n" in body else ""  # the rest of the START line


def gutenberg_documents(directory: str, split: str,
                        min_chars: int = GUTENBERG_DOCUMENT_CHARS) -> list[str]:
    """Documents of the books of `split` ("train" or "validation", `gutenberg_validation`).

    Each book's body (`gutenberg_body`) is cut into paragraphs at blank lines, each
    paragraph's lines joined by single spaces; a document is a run of consecutive
    paragraphs of at least `min_chars` characters (the last of a book may be shorter),
    so LM adaptation continues real text and span corruption sees whole paragraphs.
    """
    documents = []
    for book in gutenberg_books(directory):
        if gutenberg_validation(book) != (split == "validation"):
            continue
        path = os.path.join(directory, book)
        with tf.io.gfile.GFile(path, "rb") as f:
            text = f.read().decode("utf-8-sig").replace("\r\n", "\n")
        paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", gutenberg_body(text, path)))
        run: list[str] = []
        for paragraph in filter(None, paragraphs):
            run.append(paragraph)
            if sum(map(len, run)) >= min_chars:
                documents.append("\n".join(run))
                run = []
        if run:
            documents.append("\n".join(run))
    return documents


# The fields of each training file that hold running text (not labels or words).
TEXT_FIELDS = {
    "boolq": ("passage", "question"), "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2"), "multirc": ("paragraph", "question", "answer"),
    "record": ("passage", "query"), "rte": ("premise", "hypothesis"),
    "wic": ("sentence1", "sentence2"), "wsc": ("text",), "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
}  # fmt: skip


def training_texts(data_dir: str | None) -> list[str]:
    """Distinct running texts of the SuperGLUE/GLUE training files present under `data_dir`.

    MultiRC loses its HTML markup, ReCoRD its `@highlight` markers and its query's
    `@placeholder` (filled with the first answer). Files absent are skipped; none at all
    is an error.
    """
    if not data_dir:
        raise ValueError(
            f"{config.TEXT_FILES_ENV}={TRAINING_TEXTS} reads the training files under the "
            f"data directory, but {config.DATA_DIR_ENV} (or gin data_paths.data_dir) is unset"
        )
    texts: dict[str, None] = {}  # ordered set
    found = []
    for task, fields in TEXT_FIELDS.items():
        try:
            rows = official.read_rows(data_dir, task, "train")
        except FileNotFoundError:
            continue
        found.append(task)
        for row in rows:
            for field in fields:
                texts[_clean_text(task, field, row)] = None
    if not found:
        raise FileNotFoundError(
            f"{data_dir}: no SuperGLUE/GLUE training file (expected e.g. "
            f"super_glue/RTE/train.jsonl or glue/SST-2/train.tsv)"
        )
    texts.pop("", None)
    return list(texts)


def _clean_text(task: str, field: str, row: dict) -> str:
    text = row[field]
    if task == "multirc":
        text = re.sub(r"<(/)?b>", "", text.replace("<br>", " "))
    elif task == "record" and field == "passage":
        text = re.sub(r"([.?!\"'])\n@highlight\n", r"\1 ", text).replace("\n@highlight\n", ". ")
    elif task == "record":
        text = text.replace("@placeholder", row["answers"][0] if row["answers"] else "")
    return text.strip()
