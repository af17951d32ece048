"""Pretrain the in-house tiny T5 that the CPU-scale demo and reproductions prompt-tune.

The paper's pipeline in miniature, through the same gin configs a user runs:
span corruption from random weights (runs/pretrain_span_corruption.gin), then LM
adaptation (runs/pretrain_lm_adaptation.gin), on the text of the SuperGLUE/GLUE
training files under --data_dir (no pretrained T5 can be downloaded here). Then it
measures the held-out span-corruption loss (the `validation` documents, about 1 in 20,
chosen by a hash and never trained on) of a random model of the same shape, of the
span-corruption model and of the LM-adapted one, and writes the final model as a
bfloat16 Hugging Face directory with REPORT.md beside it.

    python scripts/pretrain_tiny.py --data_dir ../shared/data \\
        --out prompt_jax/demo_data/inhouse_tiny_t5

Runs already finished under --work_dir are reused, not redone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys

from jobs import DEMO_DATA, REPO, SHARED_DATA

from prompt_jax.model_dir import HF_EXPORT, eval_results, read_json

# The recipe's defaults (also read by the reproduction scripts, e.g. Figure 3d).
SPAN_STEPS, LM_STEPS, BATCH_SIZE = 800, 200, 16


def prompt_jax(*args: str) -> str:
    cmd = [sys.executable, "-m", "prompt_jax.cli", *args]
    print("$ prompt-jax " + " ".join(args), flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"prompt-jax {args[0]} failed with exit code {proc.returncode}")
    return proc.stdout


def data_bindings(data_dir: str, vocab: str | None = None) -> list[str]:
    vocab = vocab or os.path.join(data_dir, "t5", "spiece.model")
    return [f"--gin.prompt_jax.tasks.data_paths.data_dir='{data_dir}'",
            "--gin.prompt_jax.tasks.data_paths.text_files='superglue_glue_train'",
            f"--gin.prompt_jax.tasks.data_paths.vocab='{vocab}'"]


def stage(name: str, gin_file: str, model_dir: str, steps: int, batch: int, extra: list[str],
          data: list[str], size: str = "inhouse_tiny") -> str:
    export = os.path.join(model_dir, HF_EXPORT)
    if os.path.isfile(os.path.join(export, "model.safetensors")):
        print(f"{name}: reusing {export}", flush=True)
        return export
    prompt_jax("train", f"--gin_file={gin_file}", f"--gin_file=models/sizes/{size}.gin",
               f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
               f"--gin.BATCH_SIZE={batch}", f"--gin.EVAL_PERIOD={max(steps // 4, 1)}",
               *extra, *data)
    return export


def heldout_loss(checkpoint: str | None, model_dir: str, data: list[str],
                 size: str = "inhouse_tiny") -> float:
    """Span-corruption cross-entropy per target token on the held-out documents."""
    out = eval_results(model_dir, "validation")
    if not os.path.exists(out):
        prompt_jax("eval", "--gin_file=runs/prompt_eval.gin",
                   "--gin_file=models/t5_1_1_prompt.gin",
                   f"--gin_file=models/sizes/{size}.gin",
                   "--gin.MIXTURE_OR_TASK_NAME='span_corruption'",
                   f"--gin.INITIAL_CHECKPOINT={repr(checkpoint)}",
                   f"--gin.MODEL_DIR='{model_dir}'",
                   "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 32}",
                   "--gin.ModelSpec.dropout_rate=0.0", *data)
    return read_json(out)["metrics"]["loss"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", default=str(SHARED_DATA),
                   help="official SuperGLUE/GLUE files (super_glue/<TASK>/train.jsonl, ...) "
                        "and t5/spiece.model")
    p.add_argument("--work_dir", default=os.path.join(REPO, "runs", "pretrain_tiny"))
    p.add_argument("--out", default=str(DEMO_DATA / "inhouse_tiny_t5"))
    p.add_argument("--span_steps", type=int, default=SPAN_STEPS)
    p.add_argument("--lm_steps", type=int, default=LM_STEPS)
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    p.add_argument("--size", default="inhouse_tiny",
                   help="a size in prompt_jax.t5.config.SIZES with a gin file "
                        "models/sizes/<size>.gin (other in-house sizes: Figure 1 at CPU scale)")
    p.add_argument("--vocab", default=None,
                   help="SentencePiece model (default: <data_dir>/t5/spiece.model)")
    args = p.parse_args()
    data_dir = os.path.abspath(args.data_dir)
    data = data_bindings(data_dir, args.vocab and os.path.abspath(args.vocab))
    work = os.path.abspath(args.work_dir)

    span = stage("span corruption", "runs/pretrain_span_corruption.gin",
                 os.path.join(work, "span_corruption"), args.span_steps, args.batch_size,
                 [], data, args.size)
    lm = stage("LM adaptation", "runs/pretrain_lm_adaptation.gin",
               os.path.join(work, "lm_adaptation"), args.lm_steps, args.batch_size,
               [f"--gin.INITIAL_CHECKPOINT='{span}'"], data, args.size)

    # A random model of the same shape: the train job saves its random initial weights to
    # MODEL_DIR/base_model before the first step.
    random_dir = os.path.join(work, "random")
    if not os.path.isdir(os.path.join(random_dir, "base_model")):
        prompt_jax("train", "--gin_file=runs/pretrain_span_corruption.gin",
                   f"--gin_file=models/sizes/{args.size}.gin", f"--gin.MODEL_DIR='{random_dir}'",
                   "--gin.TRAIN_STEPS=1", "--gin.EVAL_PERIOD=1", "--gin.train.eval_split=None",
                   "--gin.train.export_hf=False", *data)
    losses = {
        "random (same shape)": heldout_loss(os.path.join(random_dir, "base_model"),
                                            os.path.join(work, "eval_random"), data, args.size),
        "span corruption": heldout_loss(span, os.path.join(work, "eval_span"), data, args.size),
        "+ LM adaptation": heldout_loss(lm, os.path.join(work, "eval_lm"), data, args.size),
    }

    # The committed copy: bfloat16 weights (half the bytes; the demo computes in float32).
    from prompt_jax.checkpoints import load_checkpoint, save_hf

    config, params = load_checkpoint(lm)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    save_hf(config.replace(param_dtype="bfloat16"), params_as(params, "bfloat16"), args.out)
    write_report(args, losses, data_dir)
    print(json.dumps(losses, indent=1))


def params_as(params, dtype):
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)


def describe(size: str) -> str:
    from prompt_jax.t5.config import get_config

    c = get_config(size)
    return ", ".join([f"d_model {c.d_model}",
                      f"{c.num_encoder_layers}+{c.num_decoder_layers} layers",
                      "gated GELU" if c.gated_gelu else "ReLU",
                      "tied embeddings" if c.tie_embeddings else "untied embeddings",
                      "T5's 32k vocabulary"])


def write_report(args, losses: dict[str, float], data_dir: str) -> None:
    rows = "\n".join(f"| {name} | {loss:.3f} |" for name, loss in losses.items())
    default = args.size == "inhouse_tiny"
    title = "In-house tiny T5" if default else "In-house T5"
    command = "python scripts/pretrain_tiny.py" + ("" if default else f" --size {args.size}")
    text = f"""# {title} (`{args.size}`)

Built by `{command}` on {datetime.date.today().isoformat()}: span corruption
for {args.span_steps} steps, then LM adaptation (prefix LM) for {args.lm_steps} steps, batch
{args.batch_size}, from random weights, on the text of the SuperGLUE/GLUE training files found in
`{os.path.relpath(data_dir, REPO)}` (SuperGLUE RTE and WSC; their origin is in
../README.md). Shapes: `prompt_jax.t5.config.SIZES['{args.size}']` ({describe(args.size)});
weights stored in bfloat16.

Held-out span-corruption loss (cross-entropy per target token, inputs 128 / targets 32, on the
documents the text source holds out as `validation`):

| model | loss |
| --- | --- |
{rows}

A model this small, trained on about two hundred thousand tokens, knows little English: it is
an honest backbone for running the paper's pipeline at CPU scale, not a substitute for T5.
"""
    with open(os.path.join(args.out, "REPORT.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
