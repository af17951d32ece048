"""Span corruption and LM adaptation: sentinel order, statistics, determinism, text sources."""

from __future__ import annotations

import random

import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import build_data_dir, shared_file
from prompt_jax.tasks import config, pretraining, sources

from prompt_jax import tasks

V = 32100
WORDS = (
    "the of and a to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were all we her she there would their will when who him been has more "
    "if no out so said what up its about than into them can only other new some could time"
).split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """400 documents of 10-60 random words, one per line (and blank lines, skipped)."""
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(10, 60))) for _ in range(400)]
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n\n".join(lines) + "\n")
    return path, lines


@pytest.fixture(autouse=True)
def _env(monkeypatch, text_file):
    monkeypatch.setenv(config.VOCAB_ENV, str(shared_file("t5", "spiece.model")))
    monkeypatch.setenv(config.TEXT_FILES_ENV, str(text_file[0]))


def _sentinels(tokens) -> list[int]:
    return [t for t in tokens if t >= 32000]


def _reconstruct(inputs, targets) -> list[int]:
    """Puts each target span back in place of its sentinel in the inputs."""
    spans, current = {}, None
    for t in targets:
        if t >= 32000:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs:
        out.extend(spans[t] if t >= 32000 else [t])
    return out


def test_lengths_as_t5():
    assert pretraining.span_corruption_lengths(512) == (568, 114)
    assert pretraining.span_corruption_lengths(64) == (70, 14)


@pytest.mark.parametrize("length", [2, 10, 100, 568])
def test_corrupt_spans_exact(length):
    tokens = tf.range(100, 100 + length, dtype=tf.int32)
    inputs, targets = pretraining.corrupt_spans(tokens, tf.constant([[1, 2], [3, 4]]), V)
    inputs, targets = inputs.numpy().tolist(), targets.numpy().tolist()
    noise = round(length * 0.15)
    noise = min(max(noise, 1), length - 1)
    spans = max(round(noise / 3), 1)
    # Sentinels from the end of the vocabulary, in order, the same in inputs and targets.
    order = [V - 1 - k for k in range(spans)]
    assert _sentinels(inputs) == order and _sentinels(targets) == order
    assert targets[0] == V - 1  # targets start with <extra_id_0>
    assert inputs[0] == 100  # non-noise comes first
    assert len(targets) - spans == noise
    assert len(inputs) - spans == length - noise
    assert _reconstruct(inputs, targets) == list(range(100, 100 + length))


def test_corrupt_spans_is_deterministic_for_a_seed():
    tokens = tf.range(100, 400, dtype=tf.int32)
    a = pretraining.corrupt_spans(tokens, tf.constant([[5, 6], [7, 8]]), V)
    b = pretraining.corrupt_spans(tokens, tf.constant([[5, 6], [7, 8]]), V)
    c = pretraining.corrupt_spans(tokens, tf.constant([[9, 6], [7, 8]]), V)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_span_lengths_statistics():
    """Over many masks: density exactly round(L * 0.15) / L, spans averaging 3, varied."""
    lengths = []
    mask_fn = tf.function(pretraining.random_spans_noise_mask)
    for seed in range(200):
        mask = mask_fn(tf.constant(568), tf.constant([[seed, 1], [seed, 2]])).numpy()
        assert mask.sum() == 85 and not mask[0]
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        lengths.extend(edges[1::2] - edges[::2])
        assert len(edges) // 2 == 28
    lengths = np.array(lengths)
    assert lengths.mean() == pytest.approx(85 / 28)
    assert lengths.min() == 1 and lengths.max() >= 10
    # Uniform random segmentation: P(length 1) = C(83,26)/C(84,27) = 27/84.
    assert np.mean(lengths == 1) == pytest.approx(27 / 84, abs=0.03)


def _run(name, seed=7, lengths=None, shuffle=True, take=-1):
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(lengths or {"inputs": 128, "targets": 32}, split="train",
                          shuffle=shuffle, seed=seed)  # fmt: skip
    return [(list(x["inputs"]), list(x["targets"])) for x in ds.take(take).as_numpy_iterator()]


def test_span_corruption_task():
    examples = _run("span_corruption")
    assert len(examples) > 60
    noise = nonnoise = spans = 0
    for inputs, targets in examples:
        assert inputs[-1] == 1 and targets[-1] == 1  # EOS
        k = len(_sentinels(inputs))
        assert _sentinels(inputs) == _sentinels(targets) == [V - 1 - i for i in range(k)]
        assert len(inputs) <= 128 and len(targets) <= 32
        noise, nonnoise, spans = (
            noise + len(targets) - k - 1,
            nonnoise + len(inputs) - k - 1,
            spans + k,
        )
    assert noise / (noise + nonnoise) == pytest.approx(0.15, abs=0.005)
    assert noise / spans == pytest.approx(3.0, abs=0.15)
    # Pieces fill the inputs except the last of each run of 128 documents (4 runs here).
    assert sum(len(i) < 128 for i, _ in examples) <= 4
    assert _run("span_corruption", take=30) == examples[:30]  # same seed, same data
    with pytest.raises(ValueError, match="more than the targets length 16"):
        _run("span_corruption", lengths={"inputs": 128, "targets": 16})


def test_lm_adaptation_task(text_file):
    _, lines = text_file
    vocab = tasks.get_vocabulary()
    examples = _run("lm_adaptation", shuffle=False, lengths={"inputs": 512, "targets": 512})
    train_docs = [d for d in lines if _held_out(d) is False]
    assert len(examples) == len(train_docs)  # each document fits in one piece
    prefixes = []
    for (inputs, targets), doc in zip(examples, train_docs, strict=True):
        tokens = vocab.encode(doc)
        assert inputs[:-1] + targets[:-1] == tokens  # prefix + continuation, EOS each
        assert 1 <= len(inputs) - 1 <= len(tokens) - 1
        prefixes.append((len(inputs) - 1) / len(tokens))
    assert np.mean(prefixes) == pytest.approx(0.5, abs=0.05)  # split point uniform
    again = _run("lm_adaptation", shuffle=False, lengths={"inputs": 512, "targets": 512}, take=50)
    assert again == examples[:50]


def test_bert_style_task(text_file):
    _, lines = text_file
    examples = _run("bert_style", shuffle=False, lengths={"inputs": 64, "targets": 64})
    assert len(examples) > 20
    corrupted = masked = total = 0
    originals = []
    for inputs, targets in examples:
        assert inputs[-1] == 1 and targets[-1] == 1 and len(inputs) == len(targets) <= 64
        changed = [(i, t) for i, t in zip(inputs, targets, strict=True) if i != t]
        masked += sum(i == V - 1 for i, _ in changed)
        # Random replacements are ordinary tokens (never padding, EOS, UNK or a sentinel).
        assert all(3 <= i < V - 100 for i, _ in changed if i != V - 1)
        corrupted, total = corrupted + len(changed), total + len(inputs) - 1
        originals += targets[:-1]
    # 15% i.i.d. (a random replacement can draw the original token: rarely).
    assert corrupted / total == pytest.approx(0.15, abs=0.02)
    assert masked / corrupted == pytest.approx(0.9, abs=0.04)
    # The targets are the training documents' tokens, in order, cut into 63-token pieces.
    vocab = tasks.get_vocabulary()
    docs = [vocab.encode(d) for d in lines if _held_out(d) is False]
    assert originals == [t for d in docs for t in d][: len(originals)]
    assert _run("bert_style", shuffle=False, lengths={"inputs": 64, "targets": 64}) == examples
    with pytest.raises(ValueError, match="makes targets of 64 tokens, more than the targets "
                       "length 32"):
        _run("bert_style", lengths={"inputs": 64, "targets": 32})


def _held_out(doc: str) -> bool:
    bucket = tf.strings.to_hash_bucket_fast(doc, sources.VALIDATION_BUCKETS).numpy()
    return bool(bucket == 0)


def test_text_files_split_deterministically(text_file):
    path, lines = text_file
    source = sources.TextSource()
    read = lambda split: [
        x["text"].decode() for x in source.get_dataset(split, shuffle=False).as_numpy_iterator()
    ]
    train, validation = read("train"), read("validation")
    assert sorted(train + validation) == sorted(lines)
    assert validation == [d for d in lines if _held_out(d)]
    assert 0.02 < len(validation) / len(lines) < 0.09


def test_text_file_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(config.TEXT_FILES_ENV, f"{tmp_path}/nothing-*.txt")
    with pytest.raises(FileNotFoundError, match="nothing-\\*.txt: no file matches"):
        sources.TextSource().get_dataset("train")
    monkeypatch.setenv(config.TEXT_FILES_ENV, sources.TRAINING_TEXTS)
    monkeypatch.delenv(config.DATA_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match="PROMPT_JAX_DATA_DIR"):
        sources.TextSource().get_dataset("train")


def test_training_texts_of_the_benchmark_files(tmp_path):
    texts = sources.training_texts(str(build_data_dir(tmp_path)))
    assert len(texts) == len(set(texts))
    for expected in [
        "Sent 1: Tom went to the store. Sent 2: He bought milk.",  # MultiRC, HTML removed
        "To the store",
        "The cat sat on the mat in Paris. Cat sits on mat",  # ReCoRD, @highlight removed
        "The Cat sat on a mat.",  # ReCoRD query, @placeholder filled with the first answer
        "hide new secretions from the parental units",  # SST-2, stripped
        "How do I control my horny emotions?",  # QQP
        "Sound carries well over water .",  # WiC
    ]:
        assert expected in texts
    assert "cause" not in texts and "carry" not in texts  # labels and words are not text


# --------------------------------------------------------------------------- Gutenberg


def _book(body: str, title: str = "A BOOK", start: str = "*** START OF THIS PROJECT "
          "GUTENBERG EBOOK") -> str:
    """A file laid out as Project Gutenberg's: header, START line, body, END line, license."""
    return (f"The Project Gutenberg EBook of {title}\r\n\r\nLicense: keep out\r\n"
            f"{start} {title} ***\r\n{body}\r\n*** END OF THIS PROJECT GUTENBERG EBOOK "
            f"{title} ***\r\nStart: full license text, never trained on\r\n")


@pytest.fixture
def gutenberg(tmp_path):
    """60 tiny books by 6 authors; each book's paragraphs name the book."""
    root = tmp_path / "gutenberg"
    for a in range(6):
        for b in range(10):
            paragraphs = [f"Book {a}-{b} paragraph {i}, its first\r\nline and its second."
                          for i in range(5)]
            path = root / f"Author_{a}" / f"Book_{b}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_book("\r\n\r\n".join(paragraphs), f"BOOK {a}-{b}").encode())
    return root


def test_gutenberg_body_is_what_lies_between_the_markers():
    text = _book("one\n\ntwo").replace("\r\n", "\n")
    assert sources.gutenberg_body(text, "x.txt").strip() == "one\n\ntwo"
    other = _book("body", start="***START OF THE PROJECT GUTENBERG EBOOK").replace("\r\n", "\n")
    assert sources.gutenberg_body(other, "x.txt").strip() == "body"
    with pytest.raises(ValueError, match=r"x\.txt: expected one '\*\*\* START OF .* found 0 start"):
        sources.gutenberg_body("no markers here", "x.txt")
    with pytest.raises(ValueError, match="found 2 start and 1 end"):
        sources.gutenberg_body(text + text.split("*** END")[0], "x.txt")


def test_gutenberg_holds_out_whole_books(gutenberg):
    books = sources.gutenberg_books(str(gutenberg))
    assert len(books) == 60
    held_out = [b for b in books if sources.gutenberg_validation(b)]
    assert 0 < len(held_out) < 10
    train = sources.gutenberg_documents(str(gutenberg), "train", min_chars=100)
    validation = sources.gutenberg_documents(str(gutenberg), "validation", min_chars=100)
    name = lambda doc: doc.split(" paragraph")[0].removeprefix("Book ")
    held_names = {b.replace("Author_", "").replace("/Book_", "-").removesuffix(".txt")
                  for b in held_out}
    assert {name(d) for d in validation} == held_names
    assert not held_names & {name(d) for d in train}
    # Paragraphs: lines joined by one space; runs of >= 100 characters (two paragraphs of
    # 53 here), the book's last run shorter; nothing from outside the markers.
    first = train[0]
    assert first == ("Book 0-0 paragraph 0, its first line and its second.\n"
                     "Book 0-0 paragraph 1, its first line and its second.")
    assert sum(d.startswith("Book 0-0 ") for d in train) == 3
    assert not any("License" in d or "license" in d for d in train + validation)


def test_gutenberg_source_feeds_span_corruption(monkeypatch, gutenberg, tmp_path):
    monkeypatch.setenv(config.TEXT_FILES_ENV, f"{sources.GUTENBERG}:{gutenberg}")
    docs = [x["text"].decode() for x in
            sources.TextSource().get_dataset("validation", shuffle=False).as_numpy_iterator()]
    assert docs == sources.gutenberg_documents(str(gutenberg), "validation")
    # `gutenberg` alone reads <data_dir>/text/gutenberg.
    (tmp_path / "data" / "text").mkdir(parents=True)
    (tmp_path / "data" / "text" / "gutenberg").symlink_to(gutenberg)
    monkeypatch.setenv(config.TEXT_FILES_ENV, sources.GUTENBERG)
    monkeypatch.setenv(config.DATA_DIR_ENV, str(tmp_path / "data"))
    ds = seqio.get_mixture_or_task("span_corruption").get_dataset(
        {"inputs": 64, "targets": 16}, split="train", shuffle=False, seed=0)
    example = next(ds.as_numpy_iterator())
    assert _sentinels(example["inputs"]) and len(example["inputs"]) <= 64
    monkeypatch.delenv(config.DATA_DIR_ENV)
    with pytest.raises(ValueError, match="text/gutenberg.*PROMPT_JAX_DATA_DIR"):
        sources.TextSource().get_dataset("train")
    with pytest.raises(FileNotFoundError, match="no Gutenberg book"):
        sources.gutenberg_books(str(tmp_path))
