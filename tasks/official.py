"""Readers for the official SuperGLUE (`*.jsonl`) and GLUE (`*.tsv`) distribution files.

Each reader returns rows shaped as TFDS's `super_glue/*` and `glue/*` builders shape
them (same feature names, `label` as the class index, -1 where the file has none,
nested `idx` for MultiRC and ReCoRD), so one set of preprocessors serves both
sources. A missing file or a malformed line raises naming the file (and line).

Layout under the data directory (names as in the official zips):
  super_glue/<BoolQ|CB|COPA|MultiRC|ReCoRD|RTE|WiC|WSC>/{train,val,test}.jsonl
  super_glue/AX-b/AX-b.jsonl, super_glue/AX-g/AX-g.jsonl
  glue/<SST-2|MRPC|QQP>/{train,dev,test}.tsv
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator

import tensorflow as tf

SUPER_GLUE_DIRS = {
    "boolq": "BoolQ", "cb": "CB", "copa": "COPA", "multirc": "MultiRC", "record": "ReCoRD",
    "rte": "RTE", "wic": "WiC", "wsc": "WSC", "axb": "AX-b", "axg": "AX-g",
}  # fmt: skip
GLUE_DIRS = {"sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP"}
DIAGNOSTICS = ("axb", "axg")
SPLITS = ("train", "validation", "test")

# Feature kinds of the rows, per task: "str", "int", "strs" (list of str), or a dict;
# every row also has `idx` (int unless given) and, but for ReCoRD, `label` (int).
STR, INT, STRS = "str", "int", "strs"
_FIELDS: dict[str, dict] = {
    "boolq": {"question": STR, "passage": STR},
    "cb": {"premise": STR, "hypothesis": STR},
    "copa": {"premise": STR, "choice1": STR, "choice2": STR, "question": STR},
    "rte": {"premise": STR, "hypothesis": STR},
    "wic": {"word": STR, "sentence1": STR, "sentence2": STR,
            "start1": INT, "start2": INT, "end1": INT, "end2": INT},
    "wsc": {"text": STR, "span1_index": INT, "span2_index": INT,
            "span1_text": STR, "span2_text": STR},
    "axb": {"sentence1": STR, "sentence2": STR},
    "axg": {"premise": STR, "hypothesis": STR},
    "multirc": {"paragraph": STR, "question": STR, "answer": STR,
                "idx": {"paragraph": INT, "question": INT, "answer": INT}},
    "record": {"passage": STR, "query": STR, "entities": STRS, "answers": STRS,
               "idx": {"passage": INT, "query": INT}},
    "sst2": {"sentence": STR},
    "mrpc": {"sentence1": STR, "sentence2": STR},
    "qqp": {"question1": STR, "question2": STR},
}  # fmt: skip
ROW_SPECS = {
    task: {"idx": INT, **fields, **({} if task == "record" else {"label": INT})}
    for task, fields in _FIELDS.items()
}

# The label field's values in the official files, in class-index order.
LABELS = {
    "boolq": (False, True), "cb": ("entailment", "contradiction", "neutral"), "copa": (0, 1),
    "rte": ("entailment", "not_entailment"), "wic": (False, True), "wsc": (False, True),
    "axb": ("entailment", "not_entailment"), "axg": ("entailment", "not_entailment"),
    "multirc": (0, 1), "sst2": ("0", "1"), "mrpc": ("0", "1"), "qqp": ("0", "1"),
}  # fmt: skip
# GLUE columns: (text feature -> column, label column).
GLUE_COLUMNS = {
    "sst2": ({"sentence": "sentence"}, "label"),
    "mrpc": ({"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qqp": ({"question1": "question1", "question2": "question2"}, "is_duplicate"),
}


class MalformedLine(ValueError):
    """A line of an official file that does not have the official format."""


def official_file(data_dir: str, task: str, split: str) -> pathlib.Path:
    """The official file holding `split` of `task`; raises if it is absent."""
    if split not in SPLITS:
        raise ValueError(f"{task}: unknown split {split!r}; expected one of {SPLITS}")
    if task in GLUE_DIRS:
        name = {"train": "train", "validation": "dev", "test": "test"}[split]
        path = pathlib.Path(data_dir, "glue", GLUE_DIRS[task], f"{name}.tsv")
        layout = f"glue/{GLUE_DIRS[task]}/{{train,dev,test}}.tsv"
    elif task in DIAGNOSTICS:
        # The diagnostics ship one labelled file, read for both `validation` and `test`.
        d = SUPER_GLUE_DIRS[task]
        path = pathlib.Path(data_dir, "super_glue", d, f"{d}.jsonl")
        layout = f"super_glue/{d}/{d}.jsonl"
    else:
        name = {"train": "train", "validation": "val", "test": "test"}[split]
        path = pathlib.Path(data_dir, "super_glue", SUPER_GLUE_DIRS[task], f"{name}.jsonl")
        layout = f"super_glue/{SUPER_GLUE_DIRS[task]}/{{train,val,test}}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file. Official files are expected under the data directory "
            f"{data_dir} (PROMPT_JAX_DATA_DIR or gin data_paths.data_dir) as {layout}"
        )
    return path


def read_rows(data_dir: str, task: str, split: str) -> list[dict]:
    """All rows of `split` of `task` from the official file, validated."""
    path = official_file(data_dir, task, split)
    rows = list(_glue_rows(path, task, split)) if task in GLUE_DIRS else _jsonl_rows(path, task,
                                                                                     split)
    if not rows:
        raise ValueError(f"{path}: the {split} split of {task} holds no example")
    return rows


def _jsonl_rows(path: pathlib.Path, task: str, split: str) -> list[dict]:
    parse = _JSONL_PARSERS.get(task, _flat_row)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise MalformedLine("expected a JSON object")
                parsed = parse(obj, task)
                if split != "test" and any(r.get("label") == -1 for r in parsed):
                    raise MalformedLine(f"no 'label' in the {split} split")
                rows.extend(parsed)
            except (json.JSONDecodeError, MalformedLine) as e:
                raise MalformedLine(f"{path}:{lineno}: {e}") from None
    return rows


def rows_to_dataset(rows: list[dict], task: str) -> tf.data.Dataset:
    """A `tf.data.Dataset` of the rows, feature types as in `ROW_SPECS[task]`."""

    def column(spec, values):
        if isinstance(spec, dict):
            return {k: column(s, [v[k] for v in values]) for k, s in spec.items()}
        if spec == STRS:
            flat = [s for v in values for s in v]
            return tf.RaggedTensor.from_row_lengths(
                tf.constant(flat, tf.string, shape=[len(flat)]),
                tf.constant([len(v) for v in values], tf.int64, shape=[len(values)]),
            )
        dtype = tf.string if spec == STR else tf.int64
        return tf.constant(values, dtype, shape=[len(values)])

    return tf.data.Dataset.from_tensor_slices(column(ROW_SPECS[task], rows))


# ---------------------------------------------------------------- jsonl fields


def _field(obj: dict, key: str, kind: type | tuple):
    if key not in obj:
        raise MalformedLine(f"missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; an int field must not take a bool.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MalformedLine(
            f"field {key!r} is {value!r}, expected {getattr(kind, '__name__', kind)}"
        )
    return value


def _label(obj: dict, task: str, key: str = "label") -> int:
    if key not in obj:
        return -1  # unlabelled (test) rows; the caller rejects these outside `test`
    value, labels = obj[key], LABELS[task]
    for i, label in enumerate(labels):
        if value == label and type(value) is type(label):
            return i
    raise MalformedLine(f"field {key!r} is {value!r}, expected one of {list(labels)}")


def _flat_row(obj: dict, task: str) -> list[dict]:
    spec = ROW_SPECS[task]
    source = {**obj, **_field(obj, "target", dict)} if task == "wsc" else obj
    row = {}
    for key, kind in spec.items():
        if key != "label":
            row[key] = _field(source, key, str if kind == STR else int)
    row["label"] = _label(obj, task)
    return [_fix_wsc_spans(row) if task == "wsc" else row]


def _multirc_rows(obj: dict, task: str) -> list[dict]:
    passage = _field(obj, "passage", dict)
    text, rows = _field(passage, "text", str), []
    for q in _field(passage, "questions", list):
        for a in _field(q, "answers", list):
            rows.append({
                "paragraph": text, "question": _field(q, "question", str),
                "answer": _field(a, "text", str), "label": _label(a, "multirc"),
                "idx": {"paragraph": _field(obj, "idx", int), "question": _field(q, "idx", int),
                        "answer": _field(a, "idx", int)},
            })  # fmt: skip
    return rows


def _record_rows(obj: dict, task: str) -> list[dict]:
    passage = _field(obj, "passage", dict)
    text = _field(passage, "text", str)
    # Entity spans are inclusive of `end`; TFDS keeps the sorted set of their texts.
    spans = [
        (_field(e, "start", int), _field(e, "end", int)) for e in _field(passage, "entities", list)
    ]
    entities = sorted({text[s : e + 1] for s, e in spans})
    rows = []
    for qa in _field(obj, "qas", list):
        answers = sorted({_field(a, "text", str) for a in qa.get("answers", [])})
        rows.append({
            "passage": text, "query": _field(qa, "query", str), "entities": entities,
            "answers": answers,
            "idx": {"passage": _field(obj, "idx", int), "query": _field(qa, "idx", int)},
        })  # fmt: skip
    return rows


_JSONL_PARSERS: dict[str, Callable[[dict, str], list[dict]]] = {
    "multirc": _multirc_rows,
    "record": _record_rows,
}


def _fix_wsc_spans(row: dict) -> dict:
    """Repairs span texts that are not substrings of the text, as TFDS `wsc.fixed` does.

    The span takes the case of the word it starts at, loses a trailing period and has
    newlines turned into spaces (e.g. `the lawyer` -> `The lawyer` at the text's start).
    Two spans with intervening text cannot be repaired and are kept.
    """
    for k in ("span1", "span2"):
        span, index = row[f"{k}_text"], row[f"{k}_index"]
        if span in row["text"] or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in span:
            row["span2_index"] = 10  # TFDS sets this index and leaves the text as is
        words = row["text"].split()
        if index < len(words) and span:
            first = words[index][0]
            span = (span[0].lower() if first.islower() else span[0].upper()) + span[1:]
        row[f"{k}_text"] = span.rstrip(".").replace("\n", " ")
    return row


# ---------------------------------------------------------------- GLUE tsv


def _glue_rows(path: pathlib.Path, task: str, split: str) -> Iterator[dict]:
    text_columns, label_column = GLUE_COLUMNS[task]
    # utf-8-sig: MRPC's files start with a byte-order mark before `Quality`.
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        missing = [c for c in text_columns.values() if c not in header]
        if split != "test" and label_column not in header:
            missing.append(label_column)
        if missing:
            raise MalformedLine(f"{path}:1: header {header} lacks column(s) {missing}")
        idx = 0
        for lineno, line in enumerate(f, 2):
            if not line.strip("\r\n"):
                continue  # blank lines are no rows (as csv readers skip them)
            # QUOTE_NONE as TFDS reads them: quotes are text, a field holds no tab.
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) != len(header):
                raise MalformedLine(
                    f"{path}:{lineno}: expected {len(header)} tab-separated fields "
                    f"({', '.join(header)}), found {len(fields)}"
                )
            record = dict(zip(header, fields, strict=True))
            row = {feature: record[column] for feature, column in text_columns.items()}
            try:
                row["label"] = _label(record, task, label_column)
            except MalformedLine as e:
                raise MalformedLine(f"{path}:{lineno}: {e}") from None
            row["idx"] = idx
            idx += 1
            yield row
