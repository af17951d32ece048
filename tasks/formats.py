"""T5's text-to-text formats for SuperGLUE and GLUE (string preprocessors on TFDS-shaped rows).

  rte      "rte hypothesis: <hypothesis> premise: <premise>"            -> "entailment"
  boolq    "boolq passage: <passage> question: <question>"               -> "True"
  cb       "cb hypothesis: <hypothesis> premise: <premise>"              -> "neutral"
  copa     "copa choice1: <c1> choice2: <c2> premise: <p> question: cause" -> "choice1"
  multirc  "multirc question: <q> answer: <a> paragraph: <p>" (HTML removed) -> "True"
  record   "record query: <q> entities: <e1>, <e2> passage: <p>" -> one example per answer
  wic      "wic sentence1: <s1> sentence2: <s2> word: <w>"               -> "False"
  wsc      "wsc: <text with *pronoun* marked>"                           -> "<referent>"
  axb/axg  as rte (AX-b's sentence1/sentence2 read as premise/hypothesis)
  sst2     "sst2 sentence: <sentence>"                                   -> "positive"
  mrpc     "mrpc sentence1: <s1> sentence2: <s2>"                        -> "equivalent"
  qqp      "qqp question1: <q1> question2: <q2>"                          -> "duplicate"

Unlabelled rows (label -1) get the target "<unk>", as T5 does. Fields are joined by
single spaces without other normalization. The `taskless_` tasks drop the first word
(`remove_first_word`): "rte hypothesis: …" -> "hypothesis: …", "wsc: …" -> "…".
"""

from __future__ import annotations

from collections.abc import Sequence

import seqio
import tensorflow as tf

UNKNOWN_TARGET = "<unk>"


def _label_name(label: tf.Tensor, names: Sequence[str]) -> tf.Tensor:
    return tf.cond(
        label < 0,
        lambda: tf.constant(UNKNOWN_TARGET),
        lambda: tf.gather(tf.constant(list(names)), label),
    )


def text_to_text(benchmark: str, fields: Sequence[tuple[str, str]], label_names: Sequence[str]):
    """`"<benchmark> <name1>: <row[key1]> <name2>: …"` -> label name, keeping `idx`.

    Args:
      benchmark: the leading word, e.g. "rte".
      fields: (name shown, row key) pairs in order, e.g. (("hypothesis", "hypothesis"), …).
      label_names: class names in label-index order.
    """

    @seqio.map_over_dataset
    def fn(x):
        parts = [benchmark]
        for name, key in fields:
            parts += [f"{name}:", x[key]]
        inputs = tf.strings.join(parts, separator=" ")
        out = {"inputs": inputs, "targets": _label_name(x["label"], label_names)}
        if benchmark == "multirc":
            out["inputs"] = tf.strings.regex_replace(
                tf.strings.regex_replace(inputs, "<br>", " "), "<(/)?b>", ""
            )
            for k in ("paragraph", "question", "answer"):
                out[f"idx/{k}"] = x["idx"][k]
        else:
            out["idx"] = x["idx"]
        return out

    return fn


def sorted_fields(*keys: str) -> tuple[tuple[str, str], ...]:
    """T5 orders the fields of a task without an explicit order by name."""
    return tuple((k, k) for k in sorted(keys))


# Two WSC texts whose pronoun index points elsewhere; T5 marks them by hand.
_WSC_SPECIAL = {
    'The boy continued to whip the pony , and eventually the pony threw him over. John laughed '
    'out quite loud. "Good for him," he said. ':
    'The boy continued to whip the pony , and eventually the pony threw him over. John laughed '
    'out quite loud. "Good for *him* ," he said.',
    'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic '
    'pebble in an iron safe . Some day they might want to use it , but really for now, what more '
    'could they wish for?':
    'When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the magic '
    'pebble in an iron safe . Some day they might want to use *it* , but really for now, what '
    'more could they wish for?',
}  # fmt: skip


@seqio.map_over_dataset
def wsc_simple(x):
    """T5's "simple" WSC: the pronoun (word `span2_index` of the space-split text) is
    wrapped in `*…*`; the target is the candidate referent `span1_text`, whatever the label.
    `label` and `idx` are kept for the postprocessor.
    """
    words = tf.strings.split(x["text"], sep=" ")
    i = tf.cast(x["span2_index"], tf.int32)
    marked = tf.strings.join(["*", x["span2_text"], "*"])
    text = tf.strings.reduce_join(
        tf.concat([words[:i], [marked], words[i + 1 :]], axis=0), separator=" "
    )
    for original, fixed in _WSC_SPECIAL.items():
        text = tf.where(tf.equal(x["text"], original), fixed, text)
    return {
        "inputs": tf.strings.join(["wsc:", text], separator=" "),
        "targets": x["span1_text"],
        "label": x["label"],
        "idx": x["idx"],
    }


def record(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """T5's ReCoRD: one example per gold answer (one "<unk>" example when there is none),
    `@highlight` markers turned into sentence breaks; keeps `answers` (all gold answers)
    and `idx/passage`, `idx/query` so the metric can take the max over answers once per query.
    """

    def expand(x):
        passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
        passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
        inputs = tf.strings.join(
            ["record query:", x["query"], "entities:",
             tf.strings.reduce_join(x["entities"], separator=", "), "passage:", passage],
            separator=" ",
        )  # fmt: skip
        answers = x["answers"]
        targets = tf.cond(
            tf.size(answers) > 0, lambda: answers, lambda: tf.constant([UNKNOWN_TARGET])
        )
        n = tf.size(targets)
        return tf.data.Dataset.from_tensor_slices({
            "inputs": tf.fill([n], inputs),
            "targets": targets,
            "answers": tf.tile(answers[tf.newaxis], [n, 1]),
            "idx/passage": tf.fill([n], x["idx"]["passage"]),
            "idx/query": tf.fill([n], x["idx"]["query"]),
        })  # fmt: skip

    return dataset.flat_map(expand)


@seqio.map_over_dataset
def remove_first_word(x):
    """Text preprocessor of the `taskless_` tasks, run after the task's format: `inputs`
    lose everything up to and including their first space (" ", not other whitespace), so
    the leading task name goes ("rte hypothesis: …" -> "hypothesis: …"); inputs without
    a space are kept whole. This is the prompt-tuning reference's
    `remove_first_text_token` (`prompt_tuning/data/preprocessors.py`): a word of the text,
    not a SentencePiece token.
    """
    x = dict(x)
    x["inputs"] = tf.strings.regex_replace(x["inputs"], r"^[^ ]* ", "", replace_global=False)
    return x


def prepend_sentinel(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """Token preprocessor of the `_sentinel` tasks: targets start with `<extra_id_0>`."""
    sentinel = output_features["targets"].vocabulary.vocab_size - 1

    def fn(x):
        x = dict(x)
        x["targets"] = tf.concat([tf.constant([sentinel], x["targets"].dtype), x["targets"]], 0)
        return x

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
