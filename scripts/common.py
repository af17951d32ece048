"""Shared by the scripts that reproduce the paper's results: the two scales, the jobs they
run (`prompt-jax train|eval|infer` subprocesses with the gin configs a user would give),
reusing finished runs, reading best scores, and writing markdown tables and PNG plots.

A run's directory is `<work_dir>/<name>-<key>`, the key hashing everything the run
depends on (command, gin files, bindings, and the contents of the local checkpoints and
prompt files it reads), so a changed setting is a new run and an unchanged one is reused.
A train run is finished when best.json exists and metrics.jsonl reached TRAIN_STEPS; an
unfinished one is resumed (same config, same directory).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# TensorFlow (read by seqio in this process too) without its start-up chatter.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
GIN_DIR = REPO / "gin_configs"
DEMO_DATA = REPO / "prompt_jax" / "demo_data"
SHARED_DATA = REPO.parent / "shared" / "data"

SUPERGLUE = tuple(f"super_glue_{t}" for t in
                  ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc"))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    gin = [a for a in argv if a.startswith("--gin.")]
    args = p.parse_args([a for a in argv if not a.startswith("--gin.")])
    for a in gin:
        if "=" not in a:
            p.error(f"{a}: expected --gin.NAME=VALUE")
    return Sweep(args, gin)


def csv(value: str | None, default: Iterable, kind: Callable = str) -> tuple:
    """A comma-separated flag as a tuple of `kind` (the default when the flag is unset)."""
    return tuple(kind(v) for v in (value.split(",") if value else default) if v != "")


def shell_arg(arg: str) -> str:
    """An argument as a user would type it: gin strings as --gin.NAME="'value'"."""
    import shlex

    if shlex.quote(arg) == arg:
        return arg
    name, eq, value = arg.partition("=")
    if eq and shlex.quote(name) == name and not any(c in value for c in '"$`\\!'):
        return f'{name}="{value}"'
    return shlex.quote(arg)


# --------------------------------------------------------------------------- jobs


@dataclasses.dataclass(frozen=True)
class Job:
    """One `prompt-jax` command. `bindings` are `--gin.NAME=VALUE` strings; `inputs` the
    local checkpoints/prompt files it reads (their contents are part of the key)."""

    command: str
    name: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]
    positional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    def key(self) -> str:
        h = hashlib.sha256()
        for part in (self.command, *self.gin_files, *self.bindings, *self.positional):
            h.update(part.encode() + b"\0")
        for path in self.inputs:
            h.update(fingerprint(path).encode() + b"\0")
        return h.hexdigest()[:10]

    def argv(self, directory_binding: str | None) -> list[str]:
        extra = [directory_binding] if directory_binding else []
        return [self.command, *(f"--gin_file={f}" for f in self.gin_files), *self.bindings,
                *extra, *self.positional]


def fingerprint(path: str) -> str:
    """Content hash of a local file or directory (size and mtime for files over 64 MiB);
    the path itself for anything not local (hub ids, gs://)."""
    p = Path(path)
    if not p.exists():
        return path
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        st = f.stat()
        if st.st_size > 64 << 20:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f.read_bytes())
    return h.hexdigest()


def gin_str(value: Any) -> str:
    """A Python value as gin syntax (strings quoted)."""
    return repr(value)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(model_dir: Path, steps: int) -> bool:
    records = read_jsonl(model_dir / "metrics.jsonl")
    return (model_dir / "best.json").exists() and max((r["step"] for r in records),
                                                      default=0) >= steps


def best(model_dir: Path) -> dict:
    """best.json: {step, metric, value, metrics} (the best validation eval of the run)."""
    with open(model_dir / "best.json") as f:
        return json.load(f)


def final_eval(model_dir: Path) -> dict[str, float]:
    """The metrics of the run's last validation eval (at TRAIN_STEPS)."""
    lines = [r for r in read_jsonl(model_dir / "metrics.jsonl") if r.get("split")]
    last = max(lines, key=lambda r: r["step"])
    return {k: v for k, v in last.items() if k not in ("step", "split")}


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

    # ---- what the runs are made of

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
        export = self.pretrain_dir(size) / stage / "hf_export"
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
        self._say("$ " + " ".join(shell_arg(short_path(c)) for c in cmd))
        if self.dry_run:
            return
        subprocess.run(cmd, cwd=REPO, check=True)

    def lengths(self, task: str, prompt_length: int) -> str:
        targets = TARGET_LENGTHS.get(task.removesuffix("_sentinel"), 8)
        return gin_str({"inputs": self.text_length + prompt_length, "targets": targets})

    def size_gin(self, size: str) -> str:
        """models/sizes/<size>.gin, checked to exist and to name a size in SIZES."""
        config_name(size)
        return f"models/sizes/{size}.gin"

    def tuning_job(self, size: str, checkpoint: str, task: str, *, tuning: str = "prompt",
                   prompt_length: int = 100, init: str = "class_labels", seed: int = 0,
                   extra: Sequence[str] = ()) -> Job:
        """A prompt-tuning (runs/prompt_finetune.gin) or model-tuning
        (runs/model_finetune.gin) train run on one task. Its name is made of its settings
        (not of the script asking), so that scripts share the runs they have in common."""
        short = task.removeprefix("super_glue_")
        if tuning == "prompt":
            labels = class_labels(task) if init == "class_labels" else ()
            if labels is None:  # free-text targets (ReCoRD, WSC): the paper's fallback
                init, labels = "sampled_vocab", ()
            name = f"prompt-{size}-{short}-P{prompt_length}-{init}-s{seed}"
            files = ("models/t5_1_1_prompt.gin", self.size_gin(size), f"prompts/{init}.gin",
                     "runs/prompt_finetune.gin")
            length = [f"--gin.PROMPT_LENGTH={prompt_length}"]
            if len(labels) > prompt_length:  # as the reference: the first P labels only
                length.append(f"--gin.PromptInit.labels={gin_str(labels[:prompt_length])}")
        else:
            name = f"model-{size}-{short}-s{seed}"
            files = ("models/t5_1_1_prompt.gin", self.size_gin(size), "runs/model_finetune.gin")
            prompt_length, length = 0, []
        bindings = (f"--gin.MIXTURE_OR_TASK_NAME={gin_str(task)}",
                    f"--gin.INITIAL_CHECKPOINT={gin_str(checkpoint)}",
                    *length,
                    f"--gin.TASK_FEATURE_LENGTHS={self.lengths(task, prompt_length)}",
                    f"--gin.TRAIN_STEPS={self.steps}", f"--gin.BATCH_SIZE={self.batch_size}",
                    f"--gin.EVAL_PERIOD={self.eval_period}",
                    f"--gin.train.seed={seed}", f"--gin.train.data_seed={seed}",
                    *extra, *self.data_bindings, *self.extra)
        return Job("train", name, files, bindings, inputs=(checkpoint,))

    # ---- running

    def run_dir(self, job: Job) -> Path:
        sub = {"train": "", "eval": "eval", "infer": "infer"}[job.command]
        return self.work_dir / sub / f"{job.name}-{job.key()}"

    def train(self, job: Job) -> Path:
        """Run (or reuse, or resume) a train job -> its MODEL_DIR."""
        model_dir = self.run_dir(job)
        if finished(model_dir, self.steps):
            self._say(f"reusing {short_path(model_dir)}")
            return model_dir
        self._run(job, f"--gin.MODEL_DIR={gin_str(str(model_dir))}", model_dir)
        return model_dir

    def evaluate(self, job: Job) -> dict[str, float]:
        """Run (or reuse) an eval job -> its metrics."""
        model_dir = self.run_dir(job)
        result = model_dir / "eval_validation.json"
        if not result.exists():
            self._run(job, f"--gin.MODEL_DIR={gin_str(str(model_dir))}", model_dir)
        if self.dry_run:
            return {}
        with open(result) as f:
            return json.load(f)["metrics"]

    def infer(self, job: Job) -> list[dict]:
        """Run (or reuse) an infer job -> its prediction records."""
        out_dir = self.run_dir(job)
        output = out_dir / "predictions.jsonl"
        if not output.exists():
            self._run(job, f"--gin.OUTPUT_FILE={gin_str(str(output))}", out_dir)
        return read_jsonl(output)

    def _run(self, job: Job, directory_binding: str, log_dir: Path) -> None:
        argv = job.argv(directory_binding)
        self._say("$ prompt-jax " + " ".join(shell_arg(short_path(a)) for a in argv))
        if self.dry_run:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{job.command}.log"
        with open(log, "a") as f:
            proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", *argv], cwd=REPO,
                                  stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode:
            tail = log.read_text().replace("\r", "\n").strip().splitlines()[-15:]
            raise SystemExit(f"prompt-jax {job.command} failed (exit {proc.returncode}); "
                             f"log: {log}\n" + "\n".join(tail))
        self._say(f"  done -> {short_path(log_dir)}")

    def _say(self, message: str) -> None:
        print(message, flush=True)

    # ---- data

    def missing_data(self, task: str) -> list[str]:
        """The official files of a task's train and validation splits that are absent under
        the data directory ([] when there is none: TFDS is read)."""
        if not self.data_dir:
            return []
        official = tasks_module().official

        short = task.removesuffix("_sentinel").removeprefix("super_glue_").removeprefix("glue_")
        missing = []
        for split in ("train", "validation"):
            try:
                official.official_file(self.data_dir, short, split)
            except FileNotFoundError as e:
                missing.append(str(e).split(":")[0])
        return missing

    def majority_baseline(self, tasks: Sequence[str] | None = None) -> float:
        """The score (as `aggregate`) of always predicting each task's most frequent
        validation target: where chance lies for the runs' numbers."""
        by_task = {}
        for task in tasks or self.tasks:
            examples, post, metric_fn = self.task_eval(task)
            targets = [e.targets for e in examples]
            common_target = collections.Counter(targets).most_common(1)[0][0]
            by_task[task] = metric_fn(
                [post(e.targets, example=e.raw, is_target=True) for e in examples],
                [post(common_target, example=e.raw, is_target=False) for e in examples])
        return aggregate(by_task)

    def task_eval(self, task: str) -> tuple[list, Callable, Callable]:
        """(validation examples, postprocessor, metric_fn(targets, predictions)) of a task,
        as the task defines them (prompt_jax.infer.task_examples, seqio's metric fns)."""
        for env, value in (("PROMPT_JAX_DATA_DIR", self.data_dir),
                           ("PROMPT_JAX_VOCAB", self.vocab)):
            if value:
                os.environ[env] = value
        tasks_module()
        import seqio

        from prompt_jax import infer

        examples = list(infer.task_examples(task, "validation", 0))
        seqio_task = seqio.get_mixture_or_task(task)

        def metric_fn(targets, predictions):
            out = {}
            for fn in seqio_task.predict_metric_fns:
                out.update({k: float(getattr(v, "value", v))
                            for k, v in fn(targets, predictions).items()})
            return out

        return examples, seqio_task.postprocess_fn, metric_fn

    def require_data(self, tasks: Iterable[str]) -> None:
        missing = [m for t in tasks for m in self.missing_data(t)]
        if missing:
            raise SystemExit("missing official files: " + ", ".join(missing)
                             + " (set --data_dir or PROMPT_JAX_DATA_DIR; prompt_jax/demo_data "
                               "holds a 1,000-example slice of RTE's training set)")

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


def tasks_module():
    """prompt_jax.tasks, imported with TensorFlow's start-up lines on stderr hidden."""
    if "prompt_jax.tasks" not in sys.modules:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as null:
                os.dup2(null.fileno(), 2)
                import prompt_jax.tasks  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return sys.modules["prompt_jax.tasks"]


def _abs(path: Any) -> str | None:
    return str(Path(path).resolve()) if path and "://" not in str(path) else path


def short_path(text: Any) -> str:
    """Paths inside the repository or beside it (../shared/data), relative to it (for logs
    and tables)."""
    return (str(text).replace(str(REPO) + os.sep, "")
            .replace(str(REPO.parent) + os.sep, ".." + os.sep))


# --------------------------------------------------------------------------- sweeps


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
            jobs = {(seed, task): make(size, task, seed)
                    for seed in sweep.seeds for task in sweep.tasks}
            why = next((j for j in jobs.values() if isinstance(j, str)), None)
            if why:
                results.missing[(label, size)] = why
                continue
            scores = results.series[label][size] = []
            for seed in sweep.seeds:
                per_task = {}
                for task in sweep.tasks:
                    model_dir = sweep.train(jobs[(seed, task)])
                    results.dirs[f"{label}, {size}, {task}, seed {seed}"] = model_dir
                    if sweep.dry_run:
                        continue
                    metrics = {k: v for k, v in best(model_dir)["metrics"].items()
                               if not is_loss(k) and k not in DIAGNOSTICS}
                    last = final_eval(model_dir)
                    results.diagnostics.setdefault((label, size, task), []).append(
                        {k: v for k, v in last.items() if is_loss(k) or k in DIAGNOSTICS})
                    results.metric_names[task] = list(metrics)
                    per_task[task] = metrics
                    results.by_task.setdefault((label, size, task), []).append(
                        task_score(metrics))
                if per_task:
                    scores.append(aggregate(per_task))
    return results


def write_sweep(sweep: Sweep, results: Results, stem: str, title: str, variable: str,
                paragraphs: Sequence[str]) -> tuple[Path, Path]:
    """The Figure-3-shaped outputs: a table (variant x size, mean ± std over seeds; per task
    when there are several) and the plot of score vs model size."""
    table, plot = output(sweep, stem)
    label = score_label(sweep.tasks, {m: 0 for t in sweep.tasks
                                      for m in results.metric_names.get(t, [])})
    params = {s: param_count(s) for s in sweep.sizes}
    header = [variable] + [f"{s} ({human(params[s])})" for s in sweep.sizes]
    rows = [[name] + [fmt(by_size.get(s)) if (name, s) not in results.missing
                      else f"not run: {results.missing[(name, s)]}" for s in sweep.sizes]
            for name, by_size in results.series.items()]
    tables = [(header, rows)]
    if len(sweep.tasks) > 1:
        rows = [[name, s, t, fmt(v)] for (name, s, t), v in results.by_task.items()]
        tables.append(([variable, "size", "task", "task score"], rows))
    if results.diagnostics:  # what moves where the official metric cannot (tiny models)
        def cell(ds, key, digits):
            values = [d[key] for d in ds if key in d]
            return fmt(values, digits) if len(values) == len(ds) else "—"

        rows = [[name, s, t, cell(ds, "rank_accuracy", 1), cell(ds, "loss", 3)]
                for (name, s, t), ds in results.diagnostics.items()]
        tables.append(([variable, "size", "task", "rank accuracy (last eval)",
                        "validation loss per token (last eval)"], rows))
    baseline = sweep.majority_baseline()
    write_markdown(table, title, [*paragraphs, *sweep.setup_lines(),
                                  f"Cells: {label} (best validation eval of each run), mean ± "
                                  f"std over seeds. Predicting the majority class scores "
                                  f"{baseline:.1f}."], tables, [run_list(results.dirs)])
    plot_vs_size(plot, title, label, results.series, params, baseline,
                 loss=loss_series(results))
    return table, plot


def loss_series(results: Results) -> dict[str, dict[str, list[float]]]:
    """label -> size -> validation loss per seed (last eval; averaged over tasks), for the
    runs whose every eval logged it."""
    out: dict[str, dict[str, list[list[float]]]] = {}
    for (label, size, _), ds in results.diagnostics.items():
        values = [d["loss"] for d in ds if "loss" in d]
        if values and len(values) == len(ds):
            out.setdefault(label, {}).setdefault(size, []).append(values)
    return {label: {size: [sum(seed) / len(seed) for seed in zip(*per_task, strict=True)]
                    for size, per_task in by_size.items()}
            for label, by_size in out.items()}


# --------------------------------------------------------------------------- scores


def is_loss(name: str) -> bool:
    return name == "loss" or name.endswith("/loss")


# Reported beside the task's official metrics, never averaged into its score.
DIAGNOSTICS = ("rank_accuracy",)


def task_score(metrics: Mapping[str, float]) -> float:
    """A task's score: the mean of its metrics (SuperGLUE's convention for CB, MultiRC, ReCoRD)."""
    values = [v for k, v in metrics.items() if not is_loss(k) and k not in DIAGNOSTICS]
    return float(sum(values) / len(values))


def aggregate(by_task: Mapping[str, Mapping[str, float]]) -> float:
    """The SuperGLUE score over the eight tasks; otherwise the mean task score."""
    if {t.removesuffix("_sentinel") for t in by_task} >= set(SUPERGLUE):
        return tasks_module().superglue_score(by_task)
    return float(sum(task_score(m) for m in by_task.values()) / len(by_task))


def score_label(tasks: Sequence[str], metrics: Mapping[str, float] | None = None) -> str:
    if set(tasks) >= set(SUPERGLUE):
        return "SuperGLUE score"
    if len(tasks) == 1:
        names = [k for k in (metrics or {}) if not is_loss(k)] or ["score"]
        short = tasks[0].removeprefix("super_glue_").removeprefix("glue_").upper()
        return f"{short} {'/'.join(names)}"
    return f"mean score over {', '.join(tasks)}"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, math.sqrt(var)


def fmt(values: Sequence[float] | None, digits: int = 1) -> str:
    """`mean ± std` of a run's seeds (or a single value); '—' for none."""
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def config_name(size: str) -> str:
    """The `ModelSpec.size` (a key of prompt_jax.t5.config.SIZES) of models/sizes/<size>.gin."""
    from prompt_jax.t5.config import SIZES

    path = GIN_DIR / "models" / "sizes" / f"{size}.gin"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.gin"))
        raise SystemExit(f"{path}: no such size file (known sizes: {', '.join(known)})")
    found = re.search(r"ModelSpec\.size\s*=\s*'([^']+)'", path.read_text())
    if not found or found.group(1) not in SIZES:
        raise SystemExit(f"{path}: names size {found and found.group(1)!r}, which "
                         "prompt_jax/t5/config.py SIZES does not have")
    return found.group(1)


_PARAMS: dict[str, int] = {}


def param_count(size: str) -> int:
    """Parameters of the frozen model of a size (its `ModelSpec.size` in the gin file)."""
    if size not in _PARAMS:
        import jax
        import numpy as np

        from prompt_jax.t5.config import get_config
        from prompt_jax.t5.model import T5

        name = config_name(size)
        tokens = np.ones((1, 2), np.int32)
        shapes = jax.eval_shape(lambda r: T5(get_config(name)).init(r, tokens, tokens),
                                jax.random.PRNGKey(0))
        _PARAMS[size] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    return _PARAMS[size]


def human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


# --------------------------------------------------------------------------- writing


def write_markdown(path: Path, title: str, paragraphs: Sequence[str],
                   tables: Sequence[tuple[Sequence[str], Sequence[Sequence[Any]]]] = (),
                   after: Sequence[str] = ()) -> Path:
    """A markdown file: title, paragraphs, tables (header, rows), closing paragraphs."""
    parts = [f"# {title}", *paragraphs]
    for header, rows in tables:
        lines = ["| " + " | ".join(map(str, header)) + " |",
                 "|" + "|".join(" --- " for _ in header) + "|"]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        parts.append("\n".join(lines))
    parts += list(after)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(parts) + "\n")
    print(f"wrote {short_path(path)}", flush=True)
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_size(path: Path, title: str, ylabel: str,
                 series: Mapping[str, Mapping[str, Sequence[float]]],
                 params: Mapping[str, int], baseline: float | None = None,
                 loss: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> Path:
    """The paper's Figure 1/3 shape: score vs model parameters (log x), one line per
    series (mean, std band over seeds). series: label -> {size: scores}. With one size
    only, bars (one per series) at that size instead. `baseline`: a dashed line (the
    majority-class score). `loss` (same shape as `series`): a second panel with the
    validation loss per token, which moves where tiny models' scores cannot."""
    sizes = sorted({s for by_size in series.values() for s, v in by_size.items() if v},
                   key=params.get)
    if not sizes:
        return plot_message(path, title, "no finished run to plot")
    plt = pyplot()
    panels = [(series, ylabel, baseline)]
    if loss and any(v for by_size in loss.values() for v in by_size.values()):
        panels.append((loss, "validation loss per token (lower is better)", None))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (values, label, line) in zip(axes[0], panels, strict=True):
        _draw_vs_size(ax, values, sizes, params, label, line, bars_from_zero=line is not None)
    fig.suptitle(title)
    return save_figure(fig, path)


def _draw_vs_size(ax, series: Mapping[str, Mapping[str, Sequence[float]]], sizes: list[str],
                  params: Mapping[str, int], ylabel: str, baseline: float | None,
                  bars_from_zero: bool) -> None:
    if len(sizes) > 1:
        for label, by_size in series.items():
            xs = [params[s] for s in sizes if by_size.get(s)]
            stats = [mean_std(by_size[s]) for s in sizes if by_size.get(s)]
            ax.plot(xs, [m for m, _ in stats], marker="o", label=label)
            ax.fill_between(xs, [m - s for m, s in stats], [m + s for m, s in stats], alpha=0.2)
        ax.set_xscale("log")
        ax.set_xticks([params[s] for s in sizes], [f"{s}\n{human(params[s])}" for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("Model Parameters")
    else:
        labels = [label for label, by_size in series.items() if by_size.get(sizes[0])]
        stats = [mean_std(series[label][sizes[0]]) for label in labels]
        bars = ax.bar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats],
                      color=[f"C{i}" for i in range(len(labels))], capsize=3)
        ax.bar_label(bars, fmt="%.1f" if bars_from_zero else "%.3f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlabel(f"one model size: {sizes[0]} ({human(params[sizes[0]])} parameters)")
        values = [m for m, _ in stats] + ([baseline] if baseline is not None else [])
        if bars_from_zero:
            _bar_ylim(ax, values)
        elif values:
            lo, hi = min(values), max(values)
            pad = max((hi - lo) * 0.3, 0.05 * hi)
            ax.set_ylim(lo - pad, hi + pad)
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1,
                   label=f"majority class ({baseline:.1f})")
    ax.set_ylabel(ylabel)
    if len(sizes) > 1 or baseline is not None:
        ax.legend(fontsize=8)


def plot_bars(path: Path, title: str, ylabel: str, groups: Mapping[str, Mapping[str, float]]
              ) -> Path:
    """Grouped bars: groups (x positions) -> {bar label: value}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(groups) + 2), 4))
    labels = list(dict.fromkeys(k for g in groups.values() for k in g))
    width = 0.8 / max(len(labels), 1)
    values = []
    for j, label in enumerate(labels):
        xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(groups))]
        ys = [g.get(label, float("nan")) for g in groups.values()]
        values += [y for y in ys if y == y]
        ax.bar(xs, ys, width, label=label)
    ax.set_xticks(range(len(groups)), list(groups))
    _bar_ylim(ax, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_message(path: Path, title: str, message: str) -> Path:
    """A figure that says why there is nothing to plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=9)
    return save_figure(fig, path)


def _bar_ylim(ax, values: Sequence[float]) -> None:
    if values:
        lo, hi = min(values), max(values)
        pad = max((hi - lo) * 0.5, 2.0)
        ax.set_ylim(max(0.0, lo - pad), hi + pad)


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(f"wrote {short_path(path)}", flush=True)
    return path


def output(sweep: Sweep, stem: str) -> tuple[Path, Path]:
    """(table, plot) paths for a result at the sweep's scale: <out>/<stem>_<scale>.{md,png}."""
    base = sweep.out / f"{stem}_{sweep.scale_name}"
    return base.with_suffix(".md"), base.with_suffix(".png")


def run_list(dirs: Mapping[str, Path]) -> str:
    """A markdown list of the runs behind a table."""
    return "Runs (MODEL_DIRs; each has config.gin, metrics.jsonl, best.json):\n\n" + "\n".join(
        f"- {label}: `{short_path(d)}`" for label, d in dirs.items())
