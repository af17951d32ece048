"""Pretrain the in-house T5s that the CPU-scale demo, the tests and the reproductions prompt-tune.

The paper's pipeline in miniature, through the same gin configs a user runs:
span corruption from random weights (runs/pretrain_span_corruption.gin), then LM
adaptation (runs/pretrain_lm_adaptation.gin). The text (`--text`): Project Gutenberg
books under <data_dir>/text/gutenberg (whole books held out for validation,
`prompt_jax.tasks.sources.gutenberg_documents`) when present, else the text fields of the
SuperGLUE/GLUE training files. Then it measures the held-out span-corruption and
LM losses of a random model of the same shape, of the span-corruption model and of the
LM-adapted one, decodes a few completions, and writes the final model as a bfloat16
Hugging Face directory with REPORT.md beside it.

    python scripts/pretrain_tiny.py --size inhouse_tiny --data_dir ../shared/data \\
        --out prompt_jax/demo_data/inhouse_tiny_t5 --time_budget_minutes 100

Everything is resumable: runs finished under --work_dir are reused, an unfinished stage
resumes from its last checkpoint (every --checkpoint_period steps), and with
--time_budget_minutes the script stops its stage cleanly (a checkpoint at the current
step) when the budget is spent and exits with status 3; run the same command again to go on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import subprocess
import sys
import time

from jobs import DEMO_DATA, REPO, SHARED_DATA
from scores import missing_official_files

from prompt_jax.model_dir import HF_EXPORT, eval_results, read_json, write_json

# The recipe's defaults (also read by the reproduction scripts, e.g. Figure 3d).
SPAN_STEPS, LM_STEPS, BATCH_SIZE = 800, 200, 16
CHECKPOINT_PERIOD = 200
BUDGET_SPENT = 3  # exit status: a stage stopped early (time budget, signal); run again to go on
# Held-out evaluation: lengths per objective, and how many held-out examples.
HELDOUT = {"span_corruption": {"inputs": 128, "targets": 32},
           "lm_adaptation": {"inputs": 128, "targets": 64}}
HELDOUT_EXAMPLES = 512
HELDOUT_SUMMARY = "heldout.json"  # in the work dir: {"lengths": ..., "losses": ...}
# The encoder probe: a binary task of the demo's, its lengths, and how many training examples.
PROBE_TASK, PROBE_LENGTHS, PROBE_EXAMPLES = "glue_sst2", {"inputs": 64, "targets": 4}, 8000
# Beginnings the report completes greedily (LM adaptation's task: continue the text).
COMPLETIONS = ("It was a dark and stormy night, and", "The king said to his daughter,",
               "She opened the door and saw", "In the morning we went down to the",
               "The film is a wonderful", "This movie was terrible because")
_deadline: float | None = None


def prompt_jax(*args: str) -> None:
    """Run `prompt-jax ...` (its output streamed); past the time budget, stop it cleanly
    (SIGTERM: the train job checkpoints the current step) and exit with BUDGET_SPENT."""
    cmd = [sys.executable, "-m", "prompt_jax.cli", *args]
    print("$ prompt-jax " + " ".join(args), flush=True)
    proc = subprocess.Popen(cmd)
    try:
        proc.wait(timeout=None if _deadline is None else max(_deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait()
        print(f"time budget spent: stopped `prompt-jax {args[0]}` cleanly; run the same "
              "command again to continue", flush=True)
        raise SystemExit(BUDGET_SPENT) from None
    if proc.returncode:
        raise SystemExit(f"prompt-jax {args[0]} failed with exit code {proc.returncode}")


def default_text(data_dir: str) -> str:
    """Gutenberg when <data_dir>/text/gutenberg exists, else the SuperGLUE/GLUE texts."""
    from prompt_jax.tasks.sources import GUTENBERG, TRAINING_TEXTS

    return GUTENBERG if os.path.isdir(os.path.join(data_dir, "text", "gutenberg")) \
        else TRAINING_TEXTS


def data_bindings(data_dir: str, vocab: str | None = None, text: str | None = None
                  ) -> list[str]:
    vocab = vocab or os.path.join(data_dir, "t5", "spiece.model")
    text = text or default_text(data_dir)
    return [f"--gin.prompt_jax.tasks.data_paths.data_dir='{data_dir}'",
            f"--gin.prompt_jax.tasks.data_paths.text_files='{text}'",
            f"--gin.prompt_jax.tasks.data_paths.vocab='{vocab}'"]


def stage(name: str, gin_file: str, model_dir: str, steps: int, batch: int, extra: list[str],
          data: list[str], size: str = "inhouse_tiny",
          checkpoint_period: int = CHECKPOINT_PERIOD) -> str:
    """Train one stage (resuming from MODEL_DIR's last checkpoint if it was interrupted)."""
    export = os.path.join(model_dir, HF_EXPORT)
    if os.path.isfile(os.path.join(export, "model.safetensors")):
        print(f"{name}: reusing {export}", flush=True)
        return export
    prompt_jax("train", f"--gin_file={gin_file}", f"--gin_file=models/sizes/{size}.gin",
               f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
               f"--gin.BATCH_SIZE={batch}", f"--gin.EVAL_PERIOD={max(steps // 4, 1)}",
               f"--gin.train.checkpoint_period={min(checkpoint_period, steps)}",
               "--gin.train.eval_examples=256", *extra, *data)
    if not os.path.isfile(os.path.join(export, "model.safetensors")):
        # The train job exits 0 when a signal stops it (after saving the step it reached);
        # only a finished stage exports. The next stage must not start from this one.
        print(f"{name}: stopped before step {steps} ({export} not written); run the same "
              "command again to continue", flush=True)
        raise SystemExit(BUDGET_SPENT)
    return export


def heldout_loss(checkpoint: str | None, model_dir: str, data: list[str],
                 size: str = "inhouse_tiny", task: str = "span_corruption",
                 lengths: dict[str, int] | None = None) -> float:
    """`task`'s cross-entropy per target token on the held-out documents (at `lengths`,
    default HELDOUT's; the first HELDOUT_EXAMPLES examples of the validation split)."""
    out = eval_results(model_dir, "validation")
    if not os.path.exists(out):
        prompt_jax("eval", "--gin_file=runs/prompt_eval.gin",
                   "--gin_file=models/t5_1_1_prompt.gin",
                   f"--gin_file=models/sizes/{size}.gin",
                   f"--gin.MIXTURE_OR_TASK_NAME='{task}'",
                   f"--gin.INITIAL_CHECKPOINT={repr(checkpoint)}",
                   f"--gin.MODEL_DIR='{model_dir}'",
                   f"--gin.TASK_FEATURE_LENGTHS={lengths or HELDOUT[task]}",
                   f"--gin.evaluate.eval_examples={HELDOUT_EXAMPLES}",
                   "--gin.ModelSpec.dropout_rate=0.0", *data)
    return read_json(out)["metrics"]["loss"]


def keeps_environment(fn):
    """`fn` may point the task readers at data through the PROMPT_JAX_* variables; the
    caller's environment is restored when it returns."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        saved = dict(os.environ)
        try:
            return fn(*args, **kwargs)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return wrapped


def frozen_model(checkpoint: str):
    """(T5 without dropout, params) of the checkpoint, for the diagnostics below."""
    from prompt_jax.checkpoints import load_checkpoint
    from prompt_jax.t5.model import T5

    config, params = load_checkpoint(checkpoint)
    return T5(config.replace(dropout_rate=0.0)), params


@keeps_environment
def encoder_use(checkpoint: str, data_dir: str, text: str, vocab_path: str,
                task: str = "span_corruption", examples: int = 256, chunk: int = 32,
                lengths: dict[str, int] | None = None) -> dict[str, float]:
    """How much the decoder reads its encoder: `task`'s held-out loss per target token on the
    first `examples` validation examples with each example's own inputs, and with the
    inputs of the next example (targets unchanged). A decoder that ignores the encoder
    scores the same on both; the gap (nats per token) is what the inputs tell it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import prompt_jax.tasks  # noqa: F401  (registers the tasks)
    from prompt_jax.tasks import config as task_config

    from prompt_jax import data, losses

    os.environ.update({task_config.DATA_DIR_ENV: data_dir,
                       task_config.TEXT_FILES_ENV: text, task_config.VOCAB_ENV: vocab_path})
    ds = data.get_dataset(task, "validation", lengths or HELDOUT[task], shuffle=False, seed=0,
                          num_epochs=1)
    batch = next(ds.batch(examples).as_numpy_iterator())
    model, params = frozen_model(checkpoint)
    apply = jax.jit(lambda p, enc, dec, tgt: model.apply({"params": p}, enc, dec, tgt))
    weights = np.asarray(batch["decoder_target_tokens"] > 0, np.float32)
    out = {}
    for name, inputs in (("own inputs", batch["encoder_input_tokens"]),
                         ("another example's inputs",
                          np.roll(batch["encoder_input_tokens"], 1, axis=0))):
        total = 0.0
        for i in range(0, len(inputs), chunk):
            rows = slice(i, i + chunk)
            logits = apply(params, jnp.asarray(inputs[rows]),
                           jnp.asarray(batch["decoder_input_tokens"][rows]),
                           jnp.asarray(batch["decoder_target_tokens"][rows]))
            total -= float(losses.per_example_log_likelihood(
                logits, jnp.asarray(batch["decoder_target_tokens"][rows]),
                jnp.asarray(weights[rows])).sum())
        out[name] = total / weights.sum()
    return out


@keeps_environment
def task_probe(checkpoint: str, data_dir: str, vocab_path: str, task: str = PROBE_TASK,
               train_examples: int = PROBE_EXAMPLES, iterations: int = 2000,
               l2: float = 1e-3) -> dict[str, float]:
    """What the frozen encoder already holds about `task`: a logistic regression on its
    outputs averaged over each input's real positions (standardised; full-batch gradient
    descent, L2 `l2`), fitted on the first `train_examples` training examples and scored on
    the validation split, with the validation majority rate beside it. A reference point for
    what a prompt can reach through this encoder, not a bound (a prompt also changes what the
    encoder computes)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import prompt_jax.tasks  # noqa: F401  (registers the tasks)
    from prompt_jax.tasks import config as task_config

    from prompt_jax import data

    os.environ.update({task_config.DATA_DIR_ENV: data_dir, task_config.VOCAB_ENV: vocab_path})
    model, params = frozen_model(checkpoint)
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode)[0])

    def split(name: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        ds = data.get_dataset(task, name, PROBE_LENGTHS, shuffle=False, seed=0, num_epochs=1)
        if limit:
            ds = ds.take(limit)
        features, labels = [], []
        for batch in ds.batch(256).as_numpy_iterator():
            tokens = batch["encoder_input_tokens"]
            real = (tokens > 0)[..., None]
            encoded = np.asarray(encode(params, jnp.asarray(tokens)), np.float64)
            features.append((encoded * real).sum(1) / real.sum(1))
            labels.append(batch["decoder_target_tokens"][:, 0])  # the label's first token
        return np.concatenate(features), np.concatenate(labels)

    x_train, y_train = split("train", train_examples)
    x_val, y_val = split("validation", None)
    classes = np.unique(y_train)
    if len(classes) != 2:
        raise SystemExit(f"task_probe: {task} has {len(classes)} label first tokens, not 2")
    y_train, y_val = (y_train == classes[1]).astype(np.float64), (y_val == classes[1])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    w, b = np.zeros(x_train.shape[1]), 0.0
    for _ in range(iterations):
        residual = 1 / (1 + np.exp(-(x_train @ w + b))) - y_train
        w -= 0.5 * (x_train.T @ residual / len(residual) + l2 * w)
        b -= 0.5 * residual.mean()
    return {"train": float(((x_train @ w + b > 0) == y_train).mean()),
            "validation": float(((x_val @ w + b > 0) == y_val).mean()),
            "majority": float(max(y_val.mean(), 1 - y_val.mean()))}


def completions(checkpoint: str, vocab_path: str, max_tokens: int = 24) -> list[tuple[str, str]]:
    """Greedy continuations of COMPLETIONS by the model at `checkpoint`."""
    import jax.numpy as jnp
    import numpy as np
    from prompt_jax.tasks.config import get_vocabulary

    from prompt_jax import decoding

    vocab = get_vocabulary(vocab_path)
    model, params = frozen_model(checkpoint)
    ids = [list(vocab.encode(text)) + [1] for text in COMPLETIONS]  # EOS, as the task's inputs
    tokens = np.zeros((len(ids), max(map(len, ids))), np.int32)
    for row, piece in zip(tokens, ids, strict=True):
        row[:len(piece)] = piece
    out, _ = decoding.greedy_decode(model, params, jnp.asarray(tokens), max_tokens)
    return [(text, vocab.decode([int(t) for t in row if t > 1]))
            for text, row in zip(COMPLETIONS, np.asarray(out), strict=True)]


def main() -> None:
    global _deadline
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=str(SHARED_DATA),
                   help="text/gutenberg/<Author>/<Title>.txt, official SuperGLUE/GLUE files "
                        "(super_glue/<TASK>/train.jsonl, ...) and t5/spiece.model")
    p.add_argument("--text", default=None,
                   help="the pretraining text (prompt_jax.tasks data_paths.text_files): "
                        "'gutenberg' (default when <data_dir>/text/gutenberg exists), "
                        "'superglue_glue_train' (the default otherwise), or globs")
    p.add_argument("--work_dir", default=None,
                   help="default: runs/pretrain_tiny for inhouse_tiny, runs/pretrain_<size>")
    p.add_argument("--out", default=None,
                   help="where the bfloat16 model and REPORT.md go (replaced); default: the "
                        "bundled prompt_jax/demo_data/inhouse_tiny_t5 for inhouse_tiny, "
                        "<work_dir>/model for other sizes (as the reproduction scripts read)")
    p.add_argument("--span_steps", type=int, default=SPAN_STEPS)
    p.add_argument("--lm_steps", type=int, default=LM_STEPS)
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--span_lengths", type=feature_lengths, default=None,
                   help="INPUTS,TARGETS of the span-corruption stage (default: "
                        "runs/pretrain_span_corruption.gin's, 128,32)")
    p.add_argument("--lm_lengths", type=feature_lengths, default=None,
                   help="INPUTS,TARGETS of the LM-adaptation stage (default: "
                        "runs/pretrain_lm_adaptation.gin's, 128,64); short targets train "
                        "the decoder on the tokens next to the prefix, where a label goes")
    p.add_argument("--checkpoint_period", type=int, default=CHECKPOINT_PERIOD)
    p.add_argument("--time_budget_minutes", type=float, default=None,
                   help="stop cleanly after this long (exit status 3); rerun to continue")
    p.add_argument("--size", default="inhouse_tiny",
                   help="a size in prompt_jax.t5.config.SIZES with a gin file "
                        "models/sizes/<size>.gin (the ladder: inhouse_tiny, inhouse_small, "
                        "inhouse_base)")
    p.add_argument("--vocab", default=None,
                   help="SentencePiece model (default: <data_dir>/t5/spiece.model)")
    args = p.parse_args()
    if args.time_budget_minutes is not None:
        _deadline = time.monotonic() + 60 * args.time_budget_minutes
    data_dir = os.path.abspath(args.data_dir)
    args.text = args.text or default_text(data_dir)
    vocab = os.path.abspath(args.vocab) if args.vocab else os.path.join(data_dir, "t5",
                                                                         "spiece.model")
    data = data_bindings(data_dir, vocab, args.text)
    name = "pretrain_tiny" if args.size == "inhouse_tiny" else f"pretrain_{args.size}"
    work = os.path.abspath(args.work_dir or os.path.join(REPO, "runs", name))
    args.out = args.out or default_out(args.size, work)
    print(f"pretraining {args.size} on {args.text!r} (data {data_dir}) in {work}; the model "
          f"goes to {args.out}", flush=True)

    started = time.monotonic()
    span = stage("span corruption", "runs/pretrain_span_corruption.gin",
                 os.path.join(work, "span_corruption"), args.span_steps, args.batch_size,
                 lengths_flag(args.span_lengths), data, args.size, args.checkpoint_period)
    lm = stage("LM adaptation", "runs/pretrain_lm_adaptation.gin",
               os.path.join(work, "lm_adaptation"), args.lm_steps, args.batch_size,
               [f"--gin.INITIAL_CHECKPOINT='{span}'", *lengths_flag(args.lm_lengths)], data,
               args.size, args.checkpoint_period)

    # A random model of the same shape: the train job saves its random initial weights to
    # MODEL_DIR/base_model before the first step.
    random_dir = os.path.join(work, "random")
    if not os.path.isdir(os.path.join(random_dir, "base_model")):
        prompt_jax("train", "--gin_file=runs/pretrain_span_corruption.gin",
                   f"--gin_file=models/sizes/{args.size}.gin", f"--gin.MODEL_DIR='{random_dir}'",
                   "--gin.TRAIN_STEPS=1", "--gin.EVAL_PERIOD=1", "--gin.train.eval_split=None",
                   "--gin.train.export_hf=False", *data)
    models = {"random (same shape)": (os.path.join(random_dir, "base_model"), "random"),
              "span corruption": (span, "span"), "+ LM adaptation": (lm, "lm")}
    # Held out at the lengths each objective was trained at (a model trained on 64-token
    # inputs is not measured on 128).
    heldout = heldout_lengths(args)
    losses = {
        model: {task: heldout_loss(checkpoint, heldout_dir(work, short, task, lengths),
                                   data, args.size, task, lengths)
                for task, lengths in heldout.items()}
        for model, (checkpoint, short) in models.items()
    }
    write_json(os.path.join(work, HELDOUT_SUMMARY), {"lengths": heldout, "losses": losses})
    reads = {model: {task: encoder_use(checkpoint, data_dir, args.text, vocab, task,
                                       lengths=lengths)
                     for task, lengths in heldout.items()}
             for model, (checkpoint, _) in models.items()}
    has_probe_data = not missing_official_files(data_dir, PROBE_TASK)
    probes = {model: task_probe(checkpoint, data_dir, vocab)
              for model, (checkpoint, _) in models.items()} if has_probe_data else {}
    samples = completions(lm, vocab)

    # The committed copy: bfloat16 weights (half the bytes; the demo computes in float32).
    from prompt_jax.checkpoints import load_checkpoint, save_hf

    config, params = load_checkpoint(lm)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    save_hf(config.replace(param_dtype="bfloat16"), params_as(params, "bfloat16"), args.out)
    write_report(args, losses, reads, probes, samples, data_dir, work,
                 time.monotonic() - started)
    print(json.dumps({"losses": losses, "encoder_use": reads, "probe": probes}, indent=1,
                     default=float))


def heldout_lengths(args) -> dict[str, dict[str, int]]:
    """Each objective's held-out lengths: its stage's training lengths when given, else
    HELDOUT's (the gin files' defaults)."""
    return {"span_corruption": args.span_lengths or HELDOUT["span_corruption"],
            "lm_adaptation": args.lm_lengths or HELDOUT["lm_adaptation"]}


def heldout_dir(work: str, model: str, task: str, lengths: dict[str, int]) -> str:
    """The eval run of one model's held-out loss (`model` random / span / lm); keyed by the
    lengths, so a result at other lengths is never reused."""
    key = "" if lengths == HELDOUT[task] else f"_{lengths['inputs']}x{lengths['targets']}"
    return os.path.join(work, f"eval_{model}_{task}{key}")


def default_out(size: str, work: str) -> str:
    """The bundled backbone is inhouse_tiny's; any other size writes beside its runs, never
    over the bundled model."""
    return str(DEMO_DATA / "inhouse_tiny_t5") if size == "inhouse_tiny" \
        else os.path.join(work, "model")


def feature_lengths(text: str) -> dict[str, int]:
    """'64,16' -> {'inputs': 64, 'targets': 16} (the --span_lengths / --lm_lengths flags)."""
    try:
        inputs, targets = (int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected INPUTS,TARGETS (two integers, e.g. 64,16), "
                                         f"found {text!r}") from None
    if inputs < 2 or targets < 1:
        raise argparse.ArgumentTypeError(f"expected inputs >= 2 and targets >= 1, found {text!r}")
    return {"inputs": inputs, "targets": targets}


def lengths_flag(lengths: dict[str, int] | None) -> list[str]:
    return [] if lengths is None else [f"--gin.TASK_FEATURE_LENGTHS={lengths}"]


def params_as(params, dtype):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def devices() -> str:
    """What JAX computes on here (the train jobs run on the same machine): e.g. '2 CPU
    cores (cpu, no accelerator)' or '1× NVIDIA H200 (gpu)'."""
    import jax

    found = jax.devices()
    if found[0].platform == "cpu":
        return f"{os.cpu_count()} CPU cores (cpu, no accelerator)"
    return f"{len(found)}× {found[0].device_kind} ({found[0].platform})"


def describe(size: str) -> str:
    from prompt_jax.t5.config import get_config

    c = get_config(size)
    return ", ".join([f"d_model {c.d_model}",
                      f"{c.num_encoder_layers}+{c.num_decoder_layers} layers",
                      "gated GELU" if c.gated_gelu else "ReLU",
                      "tied embeddings" if c.tie_embeddings else "untied embeddings",
                      "T5's 32k vocabulary"])


def stage_facts(model_dir: str) -> dict[str, float]:
    """Steps run and the train job's throughput, from a stage's metrics.jsonl."""
    from prompt_jax.model_dir import read_metrics

    rows = [r for r in read_metrics(model_dir) if "examples_per_second" in r]
    rates = sorted(r["examples_per_second"] for r in rows)
    return {"steps": rows[-1]["step"] if rows else 0,
            "examples_per_second": rates[len(rates) // 2] if rates else float("nan")}


def write_report(args, losses: dict[str, dict[str, float]],
                 reads: dict[str, dict[str, dict[str, float]]],
                 probes: dict[str, dict[str, float]], samples: list[tuple[str, str]],
                 data_dir: str, work: str, seconds: float) -> None:
    from prompt_jax.tasks.sources import GUTENBERG

    rows = "\n".join(f"| {model} | {by_task['span_corruption']:.3f} | "
                     f"{by_task['lm_adaptation']:.3f} |" for model, by_task in losses.items())
    span, lm = (stage_facts(os.path.join(work, s)) for s in ("span_corruption", "lm_adaptation"))
    command = (f"python scripts/pretrain_tiny.py --size {args.size} --span_steps "
               f"{args.span_steps} --lm_steps {args.lm_steps} --batch_size {args.batch_size}"
               + ("" if args.text == default_text(data_dir) else f" --text {args.text}")
               + "".join(f" --{flag} {v['inputs']},{v['targets']}" for flag, v in
                         (("span_lengths", args.span_lengths), ("lm_lengths", args.lm_lengths))
                         if v is not None)
               + ("" if args.work_dir is None else f" --work_dir {os.path.relpath(work, REPO)}")
               + ("" if args.out == default_out(args.size, work)
                  else f" --out {os.path.relpath(args.out, REPO)}"))
    if args.text == GUTENBERG:
        source = (f"the Project Gutenberg books under `{os.path.relpath(data_dir, REPO)}/text/"
                  "gutenberg` (240 public-domain English books; only the text between each "
                  "file's `*** START` and `*** END` lines; 15 whole books held out for "
                  "validation by `prompt_jax.tasks.sources.gutenberg_validation`)")
    else:
        source = (f"`{args.text}` under `{os.path.relpath(data_dir, REPO)}` "
                  "(prompt_jax.tasks.sources.TextSource; 1 document in 20 held out)")
    from prompt_jax.tasks.pretraining import span_corruption_lengths

    heldout = heldout_lengths(args)
    span_lengths, lm_lengths = heldout["span_corruption"], heldout["lm_adaptation"]
    raw = span_corruption_lengths(span_lengths["inputs"])[0]
    # LM adaptation splits pieces of inputs - 1 tokens into prefix and targets.
    tokens = {"span": args.span_steps * args.batch_size * raw,
              "lm": args.lm_steps * args.batch_size * (lm_lengths["inputs"] - 1)}
    shown = "\n".join(f"| {text} | {out} |" for text, out in samples)

    def use(by: dict[str, float]) -> str:
        own, other = by["own inputs"], by["another example's inputs"]
        return f"{own:.3f} / {other:.3f} / **{other - own:.3f}**"

    read_rows = "\n".join(f"| {model} | {use(by['span_corruption'])} | "
                          f"{use(by['lm_adaptation'])} |" for model, by in reads.items())
    probe_rows = "\n".join(f"| {model} | {100 * by['train']:.1f} | {100 * by['validation']:.1f} |"
                           for model, by in probes.items())
    majority = next(iter(probes.values()))["majority"] if probes else 0.0
    probe_text = f"""What the encoder holds about a task: a logistic regression on the frozen
encoder's outputs averaged over each input's real positions, fitted on the first
{PROBE_EXAMPLES:,} `{PROBE_TASK}` training examples, accuracy (%) on its validation split
(majority rate {100 * majority:.1f}; `task_probe` in the script). A reference point for what
a prompt can reach through this encoder.

| model | train | validation |
| --- | --- | --- |
{probe_rows}

""" if probes else ""
    text = f"""# In-house T5 `{args.size}`

Built by `{command}` on {datetime.date.today().isoformat()} ({devices()}):
span corruption for {args.span_steps} steps, then LM adaptation (prefix LM) for
{args.lm_steps} steps, batch {args.batch_size}, from random weights, on {source}.
Shapes: `prompt_jax.t5.config.SIZES['{args.size}']` ({describe(args.size)}); weights stored
in bfloat16. Text seen: about {tokens['span'] / 1e6:.1f}M tokens of span corruption ({raw} raw
tokens per example at inputs {span_lengths['inputs']} / targets {span_lengths['targets']}) and at
most {tokens['lm'] / 1e6:.1f}M of LM adaptation (inputs {lm_lengths['inputs']} / targets
{lm_lengths['targets']}).
Throughput of the train job (median examples/s): span corruption
{span['examples_per_second']:.1f}, LM adaptation {lm['examples_per_second']:.1f}; wall time of
the last invocation {seconds / 60:.0f} min (stages reused from earlier invocations not counted).

Held-out losses (cross-entropy per target token on the first {HELDOUT_EXAMPLES} validation
examples, at the lengths each objective was trained at: span corruption at inputs
{span_lengths['inputs']} / targets {span_lengths['targets']}, LM adaptation at inputs
{lm_lengths['inputs']} / targets {lm_lengths['targets']}):

| model | span corruption | LM adaptation |
| --- | --- | --- |
{rows}

Does the decoder read its encoder? The same losses on the first 256 validation examples with
each example's own inputs / with the next example's inputs (targets unchanged) / the gap, in
nats per target token (`encoder_use` in the script). A decoder that ignores its encoder has a
gap of 0; a prompt, which acts through the encoder, can only steer what the decoder reads.

| model | span corruption | LM adaptation |
| --- | --- | --- |
{read_rows}

{probe_text}Greedy continuations by the LM-adapted model (24 tokens at most):

| input | continuation |
| --- | --- |
{shown}
"""
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
