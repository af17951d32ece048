"""The command line every reproduction script shares and what it resolves to: a Sweep (the
scale's settings, the frozen models, the jobs of its runs and the running of them) and
`run_variants`, which trains each variant x size x seed x task and collects the scores.

A run's directory is `<work_dir>/<name>-<key>`, the key hashing everything the run
depends on (command, gin files, bindings, and the contents of the local checkpoints and
prompt files it reads), so a changed setting is a new run and an unchanged one is reused.
A train run is finished when best.json exists and metrics.jsonl reached TRAIN_STEPS
(prompt_jax.model_dir.finished); an unfinished one is resumed (same config, same directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jobs
from jobs import DEMO_DATA, REPO, SHARED_DATA, Job, gin_str, shell_arg, short_path, size_gin
from scores import (
    DIAGNOSTICS,
    SUPERGLUE,
    aggregate,
    majority_score,
    missing_official_files,
    task_score,
    tasks_module,
)

from prompt_jax.cli import UsageError, split_gin_args
from prompt_jax.evaluation import is_loss
from prompt_jax.model_dir import (
    HF_EXPORT,
    PREDICTIONS,
    eval_results,
    final_eval,
    finished,
    read_best,
    read_json,
)

# Targets are short labels (8 tokens, as runs/prompt_finetune.gin) except where they are
# free text: ReCoRD's entities, WSC's referents (at most 15 tokens in the official files).
TARGET_LENGTHS = {"super_glue_record": 32, "super_glue_wsc": 16}
# Published checkpoints (Hugging Face hub ids; any path or t5x checkpoint also works).
LM100K = "google/t5-{size}-lm-adapt"  # T5 1.1 + 100K steps of LM adaptation ("lm100k")
T5_1_1 = "google/t5-v1_1-{size}"  # T5 1.1, span corruption only


@dataclasses.dataclass(frozen=True)
class Scale:
    """Defaults of a scale; every field can be overridden on the command line."""

    sizes: tuple[str, ...]  # gin files models/sizes/<size>.gin
    tasks: tuple[str, ...]
    steps: int
    batch_size: int
    eval_period: int
    text_length: int  # input tokens; the encoder gets text_length + P
    seeds: tuple[int, ...]
    single_size: str  # the model of the single-size results (Tables 1-3, section 7)


SCALES = {
    # Section 3 of the paper: T5 1.1 lm100k, SuperGLUE (each task its own prompt), batch 32,
    # 30K steps, an eval every 1K keeping the best, inputs 512; Figure 3 is 3 runs per point.
    "paper": Scale(("small", "base", "large", "xl", "xxl"), SUPERGLUE, 30_000, 32, 1_000, 512,
                   (0, 1, 2), "xxl"),
    # The in-house tiny T5 on SuperGLUE RTE: short runs that finish on 2 CPU cores.
    "cpu": Scale(("inhouse_tiny",), ("super_glue_rte",), 300, 16, 100, 128, (0,), "inhouse_tiny"),
}
# P-tuning v2 without and with its classification head (gin_configs/methods/<name>.gin).
DEEP_METHODS = ("p_tuning_v2", "p_tuning_v2_head")
# Figure 1's in-house ladder (sizes in prompt_jax/t5/config.py SIZES).
CPU_SIZES = ("inhouse_mini", "inhouse_tiny")


# --------------------------------------------------------------------------- command line


def parser(description: str, sizes: str = "many") -> argparse.ArgumentParser:
    """The flags every script shares; `sizes` is "many" (--sizes) or "one" (--size)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --gin.NAME=VALUE arguments are passed to every "
                                       "prompt-jax command the script runs (and so are part of "
                                       "each run's key).")
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    p.add_argument("--steps", type=int, help="TRAIN_STEPS of every run (default: the scale's)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--eval_period", type=int)
    p.add_argument("--seeds", help="comma-separated run seeds (train.seed and train.data_seed)")
    p.add_argument("--tasks", help="comma-separated task names (default: the scale's)")
    if sizes == "many":
        p.add_argument("--sizes", help="comma-separated model sizes (models/sizes/<size>.gin)")
    else:
        p.add_argument("--size", help="model size (models/sizes/<size>.gin)")
    p.add_argument("--checkpoint",
                   help=f"frozen model per size, '{{size}}' filled in (paper default: {LM100K}; "
                        "cpu default: the in-house model of that size)")
    p.add_argument("--out", default=str(REPO / "docs" / "reproduction"),
                   help="where the table (.md) and the plot (.png) go")
    p.add_argument("--work_dir", help="run directories (default: runs/reproduction/<scale>)")
    p.add_argument("--data_dir", help="official SuperGLUE/GLUE files (default: "
                                      "$PROMPT_JAX_DATA_DIR; at cpu scale ../shared/data)")
    p.add_argument("--vocab", help="SentencePiece model (default: $PROMPT_JAX_VOCAB; at cpu "
                                   "scale <data_dir>/t5/spiece.model or the bundled copy)")
    p.add_argument("--backbone", default=str(DEMO_DATA / "inhouse_tiny_t5"),
                   help="cpu scale: the in-house inhouse_tiny model (rebuilt by "
                        "scripts/pretrain_tiny.py when missing)")
    p.add_argument("--pretrain_root", default=str(REPO / "runs"),
                   help="cpu scale: pretraining work dirs (pretrain_tiny/, pretrain_<size>/)")
    p.add_argument("--pretrain_steps", type=int,
                   help="cpu scale: steps of each pretraining stage when a model must be "
                        "rebuilt (default: scripts/pretrain_tiny.py's)")
    p.add_argument("--dry_run", action="store_true",
                   help="print the commands of the runs still to do; run nothing")
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> Sweep:
    try:
        bindings, rest = split_gin_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        p.error(str(e))
    # Passed on to every command as the user gave them (split_gin_args writes `NAME = VALUE`).
    extra = ["--gin." + b.replace(" = ", "=", 1) for b in bindings]
    return Sweep(p.parse_args(rest), extra)


def csv(value: str | None, default: Iterable, kind: Callable = str) -> tuple:
    """A comma-separated flag as a tuple of `kind` (the default when the flag is unset)."""
    return tuple(kind(v) for v in (value.split(",") if value else default) if v != "")


# --------------------------------------------------------------------------- the sweep


class Sweep:
    """The resolved settings of one script invocation, and the runner of its jobs."""

    def __init__(self, args: argparse.Namespace, extra_bindings: Sequence[str]):
        self.args = args
        self.scale_name = args.scale
        scale = SCALES[args.scale]
        self.cpu = args.scale == "cpu"
        self.steps = args.steps or scale.steps
        self.batch_size = args.batch_size or scale.batch_size
        self.eval_period = min(args.eval_period or scale.eval_period, self.steps)
        self.text_length = scale.text_length
        self.seeds = csv(args.seeds, scale.seeds, int)
        self.tasks = csv(args.tasks, scale.tasks)
        if hasattr(args, "sizes"):
            self.sizes = csv(args.sizes, scale.sizes)
        else:
            self.sizes = (args.size or scale.single_size,)
        self.out = Path(args.out).resolve()
        self.work_dir = Path(args.work_dir or REPO / "runs" / "reproduction" / args.scale).resolve()
        self.dry_run = args.dry_run
        self.extra = tuple(extra_bindings)
        self.data_dir = _abs(args.data_dir or os.environ.get("PROMPT_JAX_DATA_DIR")
                             or (SHARED_DATA if self.cpu else None))
        vocab = args.vocab or os.environ.get("PROMPT_JAX_VOCAB")
        if not vocab and self.cpu:
            shared = Path(self.data_dir or "", "t5", "spiece.model")
            vocab = shared if self.data_dir and shared.is_file() else DEMO_DATA / "spiece.model"
        self.vocab = _abs(vocab)
        self.data_bindings = tuple(
            f"--gin.prompt_jax.tasks.data_paths.{name}={gin_str(value)}"
            for name, value in (("data_dir", self.data_dir), ("vocab", self.vocab)) if value)
        self.checkpoint_template = args.checkpoint or (None if self.cpu else LM100K)
        self._pretrained: set[str] = set()

    # ---- the frozen models

    def checkpoint(self, size: str) -> str:
        """The frozen model of a size (at cpu scale rebuilt by pretrain_tiny.py if missing)."""
        if self.checkpoint_template:
            return self.checkpoint_template.format(size=size)
        return self.inhouse_model(size)

    def pretrain_dir(self, size: str) -> Path:
        name = "pretrain_tiny" if size == "inhouse_tiny" else f"pretrain_{size}"
        return Path(self.args.pretrain_root).resolve() / name

    def inhouse_model(self, size: str) -> str:
        """The in-house model of a size: span corruption + LM adaptation (pretrain_tiny.py)."""
        if not size.startswith("inhouse_"):
            raise SystemExit(f"size {size!r}: the cpu scale builds in-house models "
                             "(inhouse_*); give --checkpoint for other sizes")
        out = (Path(self.args.backbone).resolve() if size == "inhouse_tiny"
               else self.pretrain_dir(size) / "model")
        if not (out / "config.json").is_file():
            self.pretrain(size, out)
        return str(out)

    def stage_export(self, size: str, stage: str) -> str:
        """A pretraining stage's float32 export (`span_corruption` or `lm_adaptation`)."""
        export = self.pretrain_dir(size) / stage / HF_EXPORT
        if not (export / "config.json").is_file():
            self.pretrain(size, Path(self.inhouse_model(size)))
        return str(export)

    def pretrain(self, size: str, out: Path) -> None:
        if size in self._pretrained:  # a dry run prints the command once
            return
        self._pretrained.add(size)
        cmd = [sys.executable, str(REPO / "scripts" / "pretrain_tiny.py"), "--size", size,
               "--work_dir", str(self.pretrain_dir(size)), "--out", str(out)]
        if self.data_dir:
            cmd += ["--data_dir", self.data_dir]
        if self.vocab:
            cmd += ["--vocab", self.vocab]
        if self.args.pretrain_steps:
            cmd += ["--span_steps", str(self.args.pretrain_steps),
                    "--lm_steps", str(self.args.pretrain_steps)]
        print("$ " + " ".join(shell_arg(short_path(c)) for c in cmd), flush=True)
        if self.dry_run:
            return
        subprocess.run(cmd, cwd=REPO, check=True)

    # ---- the jobs of the runs

    def lengths(self, task: str, prompt_length: int) -> str:
        targets = TARGET_LENGTHS.get(task.removesuffix("_sentinel"), 8)
        return gin_str({"inputs": self.text_length + prompt_length, "targets": targets})

    def job(self, command: str, name: str, size: str, gin_files: Sequence[str], task: str,
            checkpoint: str, settings: Sequence[str] = (), *, positional: Sequence[str] = (),
            inputs: Sequence[str] = ()) -> Job:
        """`prompt-jax <command>` on one task and frozen model: gin files
        models/t5_1_1_prompt.gin, the size's, then `gin_files`; bindings of the task and the
        checkpoint, then `settings`, the data paths and the command line's --gin. bindings.
        `inputs`: the local files it reads besides the checkpoint (prompts)."""
        files = ("models/t5_1_1_prompt.gin", size_gin(size), *gin_files)
        bindings = (f"--gin.MIXTURE_OR_TASK_NAME={gin_str(task)}",
                    f"--gin.INITIAL_CHECKPOINT={gin_str(checkpoint)}",
                    *settings, *self.data_bindings, *self.extra)
        return Job(command, name, files, bindings, tuple(positional), (checkpoint, *inputs))

    def tuning_job(self, size: str, checkpoint: str, task: str, *, tuning: str = "prompt",
                   prompt_length: int = 100, init: str = "class_labels", seed: int = 0,
                   extra: Sequence[str] = ()) -> Job:
        """A prompt-tuning (runs/prompt_finetune.gin), model-tuning (runs/model_finetune.gin)
        or P-tuning v2 (`tuning` one of DEEP_METHODS: runs/prompt_finetune.gin, then
        methods/<tuning>.gin; no input prompt) train run on one task. Its name is made of its
        settings (not of the script asking), so that scripts share the runs they have in
        common."""
        short = task.removeprefix("super_glue_")
        if tuning in DEEP_METHODS:
            name = f"{tuning}-{size}-{short}-s{seed}"
            files = ("runs/prompt_finetune.gin", f"methods/{tuning}.gin")
            prompt_length, length = 0, []
        elif tuning == "prompt":
            labels = class_labels(task) if init == "class_labels" else ()
            if labels is None:  # free-text targets (ReCoRD, WSC): the paper's fallback
                init, labels = "sampled_vocab", ()
            name = f"prompt-{size}-{short}-P{prompt_length}-{init}-s{seed}"
            files = (f"prompts/{init}.gin", "runs/prompt_finetune.gin")
            length = [f"--gin.PROMPT_LENGTH={prompt_length}"]
            if len(labels) > prompt_length:  # as the reference: the first P labels only
                length.append(f"--gin.PromptInit.labels={gin_str(labels[:prompt_length])}")
        elif tuning == "model":
            name = f"model-{size}-{short}-s{seed}"
            files = ("runs/model_finetune.gin",)
            prompt_length, length = 0, []
        else:
            raise ValueError(f"tuning={tuning!r}: one of prompt, model, "
                             + ", ".join(DEEP_METHODS))
        return self.job("train", name, size, files, task, checkpoint, (
            *length, f"--gin.TASK_FEATURE_LENGTHS={self.lengths(task, prompt_length)}",
            f"--gin.TRAIN_STEPS={self.steps}", f"--gin.BATCH_SIZE={self.batch_size}",
            f"--gin.EVAL_PERIOD={self.eval_period}",
            f"--gin.train.seed={seed}", f"--gin.train.data_seed={seed}", *extra))

    # ---- running

    def run_dir(self, job: Job) -> Path:
        sub = {"train": "", "eval": "eval", "infer": "infer"}[job.command]
        return self.work_dir / sub / f"{job.name}-{job.key()}"

    def train(self, job: Job) -> Path:
        """Run (or reuse, or resume) a train job -> its MODEL_DIR."""
        model_dir = self.run_dir(job)
        if finished(model_dir, self.steps):
            print(f"reusing {short_path(model_dir)}", flush=True)
            return model_dir
        jobs.run(job, f"--gin.MODEL_DIR={gin_str(str(model_dir))}", model_dir, self.dry_run)
        return model_dir

    def evaluate(self, job: Job) -> dict[str, float]:
        """Run (or reuse) an eval job -> its metrics."""
        model_dir = self.run_dir(job)
        result = eval_results(model_dir, "validation")
        if not os.path.exists(result):
            jobs.run(job, f"--gin.MODEL_DIR={gin_str(str(model_dir))}", model_dir, self.dry_run)
        return {} if self.dry_run else read_json(result)["metrics"]

    def infer(self, job: Job) -> list[dict]:
        """Run (or reuse) an infer job -> its prediction records."""
        out_dir = self.run_dir(job)
        output = out_dir / PREDICTIONS
        if not output.exists():
            jobs.run(job, f"--gin.OUTPUT_FILE={gin_str(str(output))}", out_dir, self.dry_run)
        if self.dry_run:
            return []
        with open(output) as f:
            return [json.loads(line) for line in f if line.strip()]

    # ---- data

    def missing_data(self, task: str) -> list[str]:
        """The official files of a task's train and validation splits that are absent under
        the data directory ([] when there is none: TFDS is read)."""
        return missing_official_files(self.data_dir, task) if self.data_dir else []

    def require_data(self, tasks: Iterable[str]) -> None:
        missing = [m for t in tasks for m in self.missing_data(t)]
        if missing:
            raise SystemExit("missing official files: " + ", ".join(missing)
                             + " (set --data_dir or PROMPT_JAX_DATA_DIR; prompt_jax/demo_data "
                               "holds a 1,000-example slice of RTE's training set)")

    def validation_examples(self, task: str) -> list:
        """A task's validation examples as the task preprocesses them
        (prompt_jax.infer.task_examples), read from the sweep's data."""
        for env, value in (("PROMPT_JAX_DATA_DIR", self.data_dir),
                           ("PROMPT_JAX_VOCAB", self.vocab)):
            if value:
                os.environ[env] = value
        tasks_module()
        from prompt_jax import infer

        return list(infer.task_examples(task, "validation"))

    def majority_baseline(self, tasks: Sequence[str] | None = None) -> float:
        """The score of always predicting each task's most frequent validation target: where
        chance lies for the runs' numbers."""
        return majority_score({t: self.validation_examples(t) for t in tasks or self.tasks})

    # ---- describing the setup

    def setup_lines(self, extra: Sequence[str] = ()) -> list[str]:
        data = short_path(self.data_dir) if self.data_dir else "TFDS"
        lines = [f"Scale `{self.scale_name}`: TRAIN_STEPS {self.steps}, batch "
                 f"{self.batch_size}, an eval every {self.eval_period} steps on the full "
                 "validation split (unless --gin.train.eval_examples says otherwise) keeping "
                 f"the best (the paper's early stopping); input text {self.text_length} tokens "
                 f"(encoder {self.text_length} + P); seeds {', '.join(map(str, self.seeds))}; "
                 f"data: {data}."]
        if self.extra:
            lines.append("Extra bindings: " + " ".join(f"`{b}`" for b in self.extra) + ".")
        return lines + list(extra)


def class_labels(task: str) -> tuple[str, ...] | None:
    """The task's label strings (None for free-text targets)."""
    return tasks_module().class_labels(task)


def _abs(path: Any) -> str | None:
    return str(Path(path).resolve()) if path and "://" not in str(path) else path


# --------------------------------------------------------------------------- variants


Variant = Callable[[str, str, int], "Job | str"]


@dataclasses.dataclass
class Results:
    """Scores of a sweep: label -> size -> [score per seed], with the runs behind them."""

    series: dict[str, dict[str, list[float]]]
    by_task: dict[tuple[str, str, str], list[float]]  # (label, size, task) -> task scores
    dirs: dict[str, Path]
    missing: dict[tuple[str, str], str]  # (label, size) -> why there is no run
    metric_names: dict[str, list[str]]  # task -> metric names
    # (label, size, task) -> per seed, the last eval's rank accuracy and validation loss
    diagnostics: dict[tuple[str, str, str], list[dict[str, float]]] = dataclasses.field(
        default_factory=dict)


def run_variants(sweep: Sweep, variants: Mapping[str, Variant]) -> Results:
    """Train (or reuse) every variant x size x seed x task. A variant maps (size, task, seed)
    to a train Job, or to a string saying why that run cannot be made (e.g. no checkpoint)."""
    results = Results({}, {}, {}, {}, {})
    for label, make in variants.items():
        results.series[label] = {}
        for size in sweep.sizes:
            planned = {(seed, task): make(size, task, seed)
                       for seed in sweep.seeds for task in sweep.tasks}
            why = next((j for j in planned.values() if isinstance(j, str)), None)
            if why:
                results.missing[(label, size)] = why
                continue
            scores = results.series[label][size] = []
            for seed in sweep.seeds:
                per_task = {}
                for task in sweep.tasks:
                    model_dir = sweep.train(planned[(seed, task)])
                    results.dirs[f"{label}, {size}, {task}, seed {seed}"] = model_dir
                    if sweep.dry_run:
                        continue
                    metrics = {k: v for k, v in read_best(model_dir)["metrics"].items()
                               if not is_loss(k) and k not in DIAGNOSTICS}
                    last = final_eval(model_dir)
                    diagnostics = {k: v for k, v in last.items()
                                   if is_loss(k) or k in DIAGNOSTICS}
                    if "head_accuracy" in last:  # its loss is per example, not per token
                        diagnostics["head_loss"] = diagnostics.pop("loss")
                    results.diagnostics.setdefault((label, size, task), []).append(diagnostics)
                    if "head_accuracy" not in metrics:  # the task's own metrics name the cells
                        results.metric_names[task] = list(metrics)
                    per_task[task] = metrics
                    results.by_task.setdefault((label, size, task), []).append(
                        task_score(metrics))
                if per_task:
                    scores.append(aggregate(per_task))
    return results
