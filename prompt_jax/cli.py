"""`prompt-jax`: gin-configured jobs, as t5x users expect.

    prompt-jax train  [--gin_file=F]... [--gin.NAME=VALUE]... [--gin_search_paths=P,...]
                      [--dry_run] [--overwrite] [--verbose]
    prompt-jax eval   [--gin_file=F]... [--gin.NAME=VALUE]...
    prompt-jax infer  [--gin_file=F]... [--gin.NAME=VALUE]... [PROMPT.npy ...]
    prompt-jax serve  [--gin_file=F]... [--gin.NAME=VALUE]...
    prompt-jax inspect PROMPT.npy [--checkpoint=DIR] [--k=5]
    prompt-jax export-peft PROMPT OUT_DIR [--base_model NAME_OR_PATH]
    prompt-jax extract CHECKPOINT OUT.npy [--variable target/encoder/prompt/prompt/prompt]

Gin files are looked up in the current directory, in `--gin_search_paths`, and in
the configs shipped with prompt_jax (`runs/`, `models/`, `prompts/`, `decoding/`).
Later files and `--gin.` bindings win. `eval` and `infer` with no `--gin_file` and
`--gin.MODEL_DIR="'X'"` read the finished run's X/config.gin (`run_config_files`). With no
`--gin_file` (and no such MODEL_DIR), `train`, `eval` and `infer` run the embedded demo
(`demo.gin`: a tiny T5 on data bundled with the package, writing to ./prompt_jax_demo unless
`--gin.MODEL_DIR` says otherwise).

Errors are one line naming the thing and what was expected, and exit non-zero;
`--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence

DEMO_GIN = {"train": "demo.gin", "eval": "demo_eval.gin", "infer": "demo_infer.gin",
            "serve": "demo_serve.gin"}


class UsageError(ValueError):
    """A mistake in the command line or the gin config."""


def gin_dir() -> str:
    import prompt_jax.gin_configs as configs

    return os.path.dirname(os.path.abspath(configs.__file__))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-jax", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "eval", "infer", "serve"):
        s = sub.add_parser(name, help=f"run the {name} job")
        s.add_argument("--gin_file", action="append", default=[],
                       help="gin file (repeatable; later files win)")
        s.add_argument("--gin_search_paths", default="",
                       help="comma-separated directories to look up gin files in")
        s.add_argument("--verbose", action="store_true", help="tracebacks and library logs")
        if name == "train":
            s.add_argument("--dry_run", action="store_true",
                           help="print per-device memory for the config and mesh; allocate "
                                "nothing")
            s.add_argument("--overwrite", action="store_true",
                           help="start over in a MODEL_DIR that holds a different run")
        if name == "infer":
            s.add_argument("prompt_files", nargs="*",
                           help="prompt .npy files; several make an ensemble")
    s = sub.add_parser("inspect", help="nearest vocabulary tokens of each prompt position")
    s.add_argument("prompt_file")
    s.add_argument("--checkpoint", default=None,
                   help="the frozen model whose embedding table to compare with (default: the "
                        "demo's)")
    s.add_argument("--vocab", default=None, help="SentencePiece model (default: the bundled T5 "
                                                  "vocabulary)")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--verbose", action="store_true")
    s = sub.add_parser("export-peft", help="write a prompt as a PEFT PROMPT_TUNING adapter")
    s.add_argument("prompt", help="a prompt artifact: .npy, PEFT adapter or prompt-tuned t5x "
                                  "checkpoint")
    s.add_argument("out_dir", help="the adapter directory to write")
    s.add_argument("--base_model", default=None,
                   help="base_model_name_or_path recorded in adapter_config.json")
    s.add_argument("--verbose", action="store_true")
    s = sub.add_parser("extract", help="one variable of a t5x checkpoint as a .npy file (the "
                                       "reference's extract_variable)")
    s.add_argument("checkpoint")
    s.add_argument("out", help="the .npy file to write")
    s.add_argument("--variable", default="target/encoder/prompt/prompt/prompt")
    s.add_argument("--verbose", action="store_true")
    return p


def split_gin_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--gin.NAME=VALUE` bindings (gin syntax on the right) from the rest."""
    bindings, rest = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            body = arg[len("--gin."):]
            if "=" not in body:
                raise UsageError(f"{arg}: expected --gin.NAME=VALUE")
            name, value = body.split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return bindings, rest


# XLA's CPU YNNPACK fusions make the T5 train step 1.35x slower on CPU (bench/RESULTS.md,
# jaxlib 0.10.2); they are off unless XLA_FLAGS names the flag or PROMPT_JAX_CPU_YNN=1.
# The flag exists in jaxlib 0.10 (XLA aborts on unknown flags, so no other version gets it).
CPU_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def set_cpu_xla_flags() -> None:
    import importlib.metadata

    flags = os.environ.get("XLA_FLAGS", "")
    keep = os.environ.get("PROMPT_JAX_CPU_YNN", "") not in ("", "0")
    if "xla_cpu_experimental_ynn_fusion_type" in flags or keep:
        return
    try:
        jaxlib = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return
    if jaxlib.startswith("0.10."):
        os.environ["XLA_FLAGS"] = f"{flags} {CPU_YNN_FLAG}".strip()


def _prepare_libraries(verbose: bool) -> None:
    """TensorFlow (for tf.data only) sees no GPU, so it never takes accelerator memory from
    JAX; without --verbose its start-up chatter and library warnings are hidden. XLA's
    backends start later (first use), so the CPU flags set here still apply."""
    set_cpu_xla_flags()
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        logging.getLogger("jax").setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
    with stderr_silenced(not verbose):  # TF prints CUDA-stub lines before its logging starts
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    if not verbose:
        import absl.logging

        absl.logging.set_verbosity(absl.logging.ERROR)


@contextlib.contextmanager
def stderr_silenced(active: bool):
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_gin(command: str, files: Sequence[str], bindings: Sequence[str],
              search_paths: str) -> None:
    """Register the jobs, parse files + bindings, and check the required/unknown macros."""
    import gin

    from prompt_jax import evaluation, infer, partitioning, tasks, train  # noqa: F401 (gin)

    if command == "serve":
        from prompt_jax import serve  # noqa: F401 (gin: serve, BatchingSpec)

    if not gin.config._REGISTRY.matching_selectors("distributed"):
        gin.external_configurable(partitioning.initialize_distributed, "distributed")

    gin.clear_config()
    # gin also reads 'a/b.gin' as file b.gin of a Python package `a`; a plain directory of
    # that name on sys.path (e.g. ./runs) makes that reader crash. Files come from the search
    # paths only.
    gin.config._FILE_READERS[:] = [(open, os.path.isfile)]
    for path in [p for p in search_paths.split(",") if p] + [os.getcwd(), gin_dir()]:
        gin.add_config_file_search_path(path)
    files = list(files) or run_config_files(command, bindings) or [DEMO_GIN[command]]
    # gin logs an error for every search path a file is not in; the real error is raised.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        gin.parse_config_files_and_bindings(files, None, finalize_config=False)
        file_macros = _macros()
        gin.parse_config_files_and_bindings(None, bindings, finalize_config=False)
    except (ValueError, OSError, SyntaxError) as e:
        raise UsageError(_one_line(str(e))) from None
    finally:
        root.setLevel(level)
    config = gin.config_str()
    for name in _macros() - file_macros:
        if f"%{name}" not in config:
            known = sorted(file_macros)
            close = difflib.get_close_matches(name, known, n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise UsageError(f"--gin.{name}: no config uses macro {name}{hint}")
    defined = _macros()
    missing = [name for name in sorted(set(re.findall(r"%([A-Z][A-Z0-9_]*)\b", config)))
               if name not in defined
               or str(gin.query_parameter(f"%{name}")) == "%gin.REQUIRED"]
    if missing:
        raise UsageError(f"missing required macro{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(missing)}: set "
                         + ", ".join(f"--gin.{name}=..." for name in missing)
                         + " or bind them in a gin file")


RUN_GIN = {"eval": "runs/prompt_eval.gin", "infer": "runs/prompt_infer.gin",
           "serve": "runs/serve.gin"}


def run_config_files(command: str, bindings: Sequence[str]) -> list[str]:
    """`eval`/`infer` with no --gin_file and `--gin.MODEL_DIR` naming a finished run: the
    job's run file, then the run's own MODEL_DIR/config.gin (its model, task, lengths, data
    paths and method), so a run of any method is evaluated without repeating its gin files.
    [] otherwise (no such config.gin: the demo's files, as before)."""
    import ast

    if command not in RUN_GIN:
        return []
    model_dir = None
    for binding in bindings:
        name, _, value = binding.partition("=")
        if name.strip() == "MODEL_DIR":
            try:
                model_dir = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise UsageError(f"--gin.MODEL_DIR={value.strip()}: expected a quoted path, "
                                 f"e.g. --gin.MODEL_DIR=\"'{value.strip()}'\"") from None
    if not isinstance(model_dir, str):
        return []
    config = os.path.join(model_dir, "config.gin")  # model_dir.CONFIG (cli imports no jax)
    if not os.path.isfile(config):  # not a run (e.g. infer's output directory): the demo
        return []
    return [RUN_GIN[command], os.path.abspath(config)]


def _macros() -> set[str]:
    import gin

    return {name for (name, selector) in gin.config._CONFIG if selector == "gin.macro"}


def _one_line(message: str) -> str:
    # gin appends where a configurable was called; the message already names the thing.
    message = re.sub(r"\s*In call to configurable '[^']*' \(<[^>]*>\)", "", message)
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3])


def run(argv: Sequence[str]) -> int:
    bindings, rest = split_gin_args(argv)
    args = _parser().parse_args(rest)
    _prepare_libraries(args.verbose)
    if args.command == "inspect":
        from prompt_jax import infer

        print(infer.inspect_prompt(args.prompt_file, args.checkpoint, args.vocab, args.k))
        return 0
    if args.command == "export-peft":
        return _export_peft(args.prompt, args.out_dir, args.base_model)
    if args.command == "extract":
        return _extract(args.checkpoint, args.out, args.variable)

    parse_gin(args.command, args.gin_file, bindings, args.gin_search_paths)
    _init_distributed()
    if args.command == "train":
        from prompt_jax import train

        result = train.train(dry_run=args.dry_run, overwrite=args.overwrite)
        if result is not None and result.best:
            b = result.best
            print(f"done: step {result.step}; best {b['metric']}={b['value']:.4g} at step "
                  f"{b['step']}")
        return 0
    if args.command == "serve":
        from prompt_jax import serve

        serve.serve()
        return 0
    if args.command == "eval":
        from prompt_jax import evaluation

        evaluation.evaluate()
        return 0
    from prompt_jax import infer

    infer.infer(prompt_files=tuple(args.prompt_files) or None)
    return 0


def _export_peft(prompt_path: str, out_dir: str, base_model: str | None) -> int:
    from prompt_jax.checkpoints.peft import save_peft
    from prompt_jax.checkpoints.prompt_artifacts import load_prompt_artifact

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{out_dir}: exists and is not a directory")
    from prompt_jax.methods import deep_prompts

    if deep_prompts.is_deep_prompt_artifact(prompt_path):  # prefix tuning's key/value prefixes
        shape = deep_prompts.export_peft(prompt_path, out_dir, base_model)
        print(f"wrote a PEFT PREFIX_TUNING adapter ({shape[0]} virtual tokens x {shape[1]}) "
              f"to {out_dir}")
        return 0
    prompt = load_prompt_artifact(prompt_path)
    save_peft(prompt, out_dir, base_model)
    print(f"wrote a PEFT PROMPT_TUNING adapter ({prompt.shape[0]} virtual tokens x "
          f"{prompt.shape[1]}) to {out_dir}")
    return 0


def _extract(checkpoint: str, out: str, variable: str) -> int:
    import numpy as np

    from prompt_jax.checkpoints.t5x import extract_variable
    from prompt_jax.prompts import save_prompt

    value = extract_variable(checkpoint, variable)
    if value.ndim == 2:
        save_prompt(out, value)  # atomic, float32: the released prompts' format
    else:
        np.save(out, np.asarray(value, np.float32), allow_pickle=False)
    print(f"wrote {variable} {list(value.shape)} to {out}")
    return 0


def _init_distributed() -> None:
    """Multi-host setup from NUM_PROCESSES/PROCESS_ID/COORDINATOR_ADDRESS (or the JAX_*
    environment variables), before anything touches a device."""
    import gin

    from prompt_jax import partitioning

    del partitioning  # `distributed` is partitioning.initialize_distributed, bound by gin
    gin.get_configurable("distributed")()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as e:  # one line, naming the thing; traceback only with --verbose
        if verbose:
            traceback.print_exc()
        message = _one_line(str(e)) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
