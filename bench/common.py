"""What the benchmark scripts share: the machine, workers, timing, memory, FLOPs, tables.

Every measured variant runs in its own worker process (`Worker`), so that each has
its own resident-memory high-water mark and no framework's thread pool or allocator
sits in another's process. The parent starts the workers one after another (building,
compiling and warming up are not timed), then times them in rounds: round r runs one
step of every variant in turn, so that a change in the machine's load (the cores are
shared) lands on all variants alike. Medians are over rounds.

Memory, per worker (Linux `/proc/self/status`):
  - `step ΔRSS`: the high-water mark of resident memory during the warm-up and timed
    steps minus the resident memory just before them (after the model, optimizer and,
    for JAX, the compiled program exist). What the steps themselves needed: activations,
    gradients, temporaries, the optimizer state torch allocates on its first step.
    Freed memory that an allocator kept from before (e.g. XLA's compiler) can be reused
    without showing here, so read it as a lower bound.
  - `peak RSS`: the process's resident high-water mark over its whole life, compile included.
  - `XLA temp` (JAX only): `compiled.memory_analysis().temp_size_in_bytes`, the scratch the
    compiled step allocates per call (arguments and outputs not included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

SIZES = {"tiny": "tiny", "small": "t5_1_1_small", "base": "t5_1_1_base",
         "large": "t5_1_1_large", "inhouse_tiny": "inhouse_tiny",
         "inhouse_small": "inhouse_small", "inhouse_base": "inhouse_base"}
# XLA's CPU backend choices (--backends): each variant's XLA_FLAGS, set before its worker
# starts JAX (`prompt-jax` itself sets only `cli.CPU_YNN_FLAG`, and only without XLA_FLAGS).
CPU_YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
BACKENDS = {
    "xla": "",  # XLA's own defaults (YNNPACK fusions on)
    "onednn": f"--xla_cpu_use_onednn=true {CPU_YNN_OFF}",
    "onednn-ynn": "--xla_cpu_use_onednn=true",
    "xnnpack": f"--xla_cpu_use_xnnpack=true {CPU_YNN_OFF}",
    "noconc": f"--xla_cpu_enable_concurrency_optimized_scheduler=false {CPU_YNN_OFF}",
}
MIB = 2**20
_PROTOCOL = "BENCH-JSON "


# ---------------------------------------------------------------- the machine


def cores() -> int:
    """CPU cores this process may run on (XLA's CPU client uses all of them)."""
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 2**20


def machine_info() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "absent"
    return {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cores": cores(), "cpu": _cpu_model(), "ram_gib": round(_ram_gib(), 1),
            "python": platform.python_version(), "versions": versions,
            "load": os.getloadavg()}


def print_machine(info: dict[str, Any]) -> None:
    v = " ".join(f"{k} {x}" for k, x in info["versions"].items())
    print(f"date {info['date']}; {info['cores']} cores ({info['cpu']}), {info['ram_gib']} GiB RAM;"
          f" XLA uses all {info['cores']} cores, torch.set_num_threads({info['cores']})")
    print(f"python {info['python']}; {v}")
    print("load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in info["load"]))


def parser(description: str, unit: str) -> argparse.ArgumentParser:
    """The flags both throughput scripts take; `unit` names what one timed call is."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--warmup", type=int, default=1, help=f"untimed {unit}s per variant")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--bf16", action="store_true", help="add the bf16 frozen-weight variants")
    p.add_argument("--ynn", action="store_true",
                   help="add the -ynn variants: XLA's CPU defaults (YNNPACK fusions on)")
    p.add_argument("--backends", action="store_true",
                   help="add a variant per XLA CPU backend choice (common.BACKENDS: oneDNN, "
                        "XNNPACK, YNN fusions, the concurrency scheduler) of each jax variant")
    p.add_argument("--variants", default="", help="comma-separated subset to run")
    p.add_argument("--matmul-size", type=int, default=2048)
    return p


# ---------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset the resident high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- workers


Setup = Callable[[dict[str, Any]], tuple[Callable[[], None], dict[str, Any]]]


def entry(main: Callable[[], None], setups: Mapping[str, Setup]) -> None:
    """A bench script's `__main__`: the parent's `main()`, or with `--worker SPEC` the
    worker of the variant whose `kind` (a key of `setups`) the spec names."""
    if "--worker" in sys.argv:
        serve(setups)
    else:
        main()


def measure(script: str, specs: dict[str, dict[str, Any]], repeats: int,
            matmul_size: int) -> tuple[dict[str, Worker], MatmulPeak]:
    """Start the workers, time `repeats` rounds, sample the matmul peak between rounds."""
    peak = MatmulPeak(matmul_size)
    peak.sample()
    workers = start_workers(script, specs)
    run_rounds(workers, repeats, between=peak.sample)
    return workers, peak


def serve(setups: Mapping[str, Setup]) -> None:
    """Worker main: `setups[spec["kind"]](spec) -> (run_once, info)`; warm up, then run on
    command.

    Protocol on stdout (lines prefixed by `_PROTOCOL`, so libraries' own prints pass):
    `ready` with `info` after the warm-up, `seconds` (wall clock) and `cpu_seconds` (all the
    process's threads) per `step` command, memory on `close`.
    """
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    if spec.get("kind") == "jax":
        # XLA's CPU flags exactly as the `prompt-jax` CLI sets them (before any backend starts).
        from prompt_jax import cli

        cli.set_cpu_xla_flags()
    run_once, info = setups[spec["kind"]](spec)
    base = rss_bytes()
    resettable = reset_peak_rss()
    warmup = []
    for _ in range(spec["warmup"]):
        t0 = time.perf_counter()
        run_once()
        warmup.append(time.perf_counter() - t0)
    _reply({"ready": True, "warmup_seconds": warmup, **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "step":
            t0, c0 = time.perf_counter(), time.process_time()
            run_once()
            _reply({"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0})
        elif cmd["cmd"] == "close":
            peak = peak_rss_bytes()
            _reply({"step_delta_rss": peak - base if resettable else None, "peak_rss": peak,
                    "process_peak_is_lifetime": not resettable})
            return


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(_PROTOCOL + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    """One variant in its own process: `python script --worker SPEC_JSON`."""

    def __init__(self, script: str, name: str, spec: dict[str, Any]):
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="2")
        if spec.get("ynn"):  # XLA's own CPU defaults; otherwise the flags `prompt-jax` sets
            env["PROMPT_JAX_CPU_YNN"] = "1"
        if spec.get("xla_flags") is not None:  # a --backends variant: exactly these flags
            env["XLA_FLAGS"] = spec["xla_flags"]
        self._proc = subprocess.Popen(
            [sys.executable, script, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
        self.info: dict[str, Any] = {}
        self.times: list[float] = []  # wall-clock seconds per step
        self.cpu_times: list[float] = []  # CPU seconds of all the worker's threads per step

    def _read(self) -> dict[str, Any]:
        for line in self._proc.stdout:
            if line.startswith(_PROTOCOL):
                return json.loads(line[len(_PROTOCOL):])
        self._stderr.seek(0)
        raise RuntimeError(f"worker {self.name} exited (code {self._proc.wait()}):\n"
                           + self._stderr.read()[-4000:])

    def wait_ready(self) -> None:
        """Block until the worker has built, compiled and warmed up its variant."""
        self.info = self._read()

    def step(self) -> float:
        self._proc.stdin.write(json.dumps({"cmd": "step"}) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        self.times.append(reply["seconds"])
        self.cpu_times.append(reply["cpu_seconds"])
        return reply["seconds"]

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def close(self) -> None:
        self._proc.stdin.write(json.dumps({"cmd": "close"}) + "\n")
        self._proc.stdin.flush()
        self.info.update(self._read())
        self._proc.wait()

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_times)


def start_workers(script: str, specs: dict[str, dict[str, Any]]) -> dict[str, Worker]:
    """Start the workers one after another (set-up and warm-up are not timed).

    One at a time: compiling T5 small takes several GiB for a moment, and seven workers
    compiling at once exhaust a 24 GiB machine. If one fails, the others are killed.
    """
    workers: dict[str, Worker] = {}
    try:
        for name, spec in specs.items():
            t0 = time.perf_counter()
            workers[name] = w = Worker(script, name, spec)
            w.wait_ready()
            print(f"  {name}: ready after {time.perf_counter() - t0:.0f} s", flush=True)
    except BaseException:
        for w in workers.values():
            w.kill()
        raise
    return workers


def run_rounds(workers: dict[str, Worker], repeats: int,
               between: Callable[[], None] | None = None) -> None:
    """`repeats` rounds of one step per worker (interleaved); `between()` once per round."""
    try:
        for r in range(repeats):
            line = []
            for name, w in workers.items():
                line.append(f"{name} {w.step():.2f}s")
            if between is not None:
                between()
            print(f"  round {r + 1}/{repeats}: " + ", ".join(line), flush=True)
        for w in workers.values():
            w.close()
    except BaseException:
        for w in workers.values():
            w.kill()
        raise


# ---------------------------------------------------------------- matmul peak


class MatmulPeak:
    """FLOP/s of an n x n x n `jnp.dot` per dtype, sampled between rounds (medians).

    Also FLOP per CPU-second of this process (`time.process_time`, all XLA threads):
    with the cores shared, wall-clock rates fall with other processes' load, while
    per-CPU-second rates mostly do not (see `Worker.cpu_times`).
    """

    def __init__(self, n: int = 2048, dtypes: Sequence[str] = ("float32", "bfloat16")):
        import jax
        import jax.numpy as jnp

        self.n = n
        self._fns = {}
        for name in dtypes:
            a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), name)
            b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), name)
            f = jax.jit(jnp.dot)
            f(a, b).block_until_ready()
            self._fns[name] = (f, a, b)
        self.samples: dict[str, list[float]] = {name: [] for name in dtypes}
        self.cpu_samples: dict[str, list[float]] = {name: [] for name in dtypes}

    def sample(self, times: int = 3) -> None:
        for name, (f, a, b) in self._fns.items():
            for _ in range(times):
                t0, c0 = time.perf_counter(), time.process_time()
                f(a, b).block_until_ready()
                t, c = time.perf_counter() - t0, time.process_time() - c0
                self.samples[name].append(2 * self.n**3 / t)
                self.cpu_samples[name].append(2 * self.n**3 / c)

    def flops_per_s(self, dtype: str) -> float:
        return statistics.median(self.samples[dtype])

    def flops_per_cpu_s(self, dtype: str) -> float:
        return statistics.median(self.cpu_samples[dtype])

    def describe(self) -> str:
        return (f"matmul peak ({self.n}x{self.n} jnp.dot, median of "
                f"{len(self.samples['float32'])}): " + ", ".join(
                    f"{d} {self.flops_per_s(d) / 1e9:.1f} GFLOP/s "
                    f"({self.flops_per_cpu_s(d) / 1e9:.1f} GFLOP per CPU-s)"
                    for d in self.samples))


# ---------------------------------------------------------------- FLOPs


def t5_matmul_flops(cfg: Any, batch: int, enc_len: int, dec_len: int, mode: str | None,
                    dec_batch: int | None = None) -> float:
    """Matmul FLOPs (2 per multiply-add) of one T5 step; elementwise work not counted.

    mode None: a forward (inference); "model": forward + backward with every weight
    trainable (each weight matmul costs 3x its forward: y, dX, dW; each activation-
    activation matmul of attention costs 3x: y and both operands' gradients);
    "prompt": weight matmuls cost 2x (y, dX; no dW), attention 3x, less what does not
    depend on the prompt (decoder layer 0's self-attention and cross-attention query).
    `tests/test_bench.py` checks all three against the dot_generals of the traced step.
    `dec_batch` (default `batch`) is the decoder's batch (rank classification decodes
    each candidate).
    """
    B, S, L = batch, enc_len, dec_len
    Bd = batch if dec_batch is None else dec_batch
    E, F, V, HD = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_heads * cfg.d_kv
    n_mlp = 3 if cfg.gated_gelu else 2
    mm = lambda rows, k, n: 2.0 * rows * k * n
    # (weight matmuls, attention matmuls) of one layer
    enc_w = 4 * mm(B * S, E, HD) + n_mlp * mm(B * S, E, F)
    enc_a = 2 * mm(B * S, S, HD)
    dec_self_w, dec_self_a = 4 * mm(Bd * L, E, HD), 2 * mm(Bd * L, L, HD)
    dec_w = dec_self_w + 2 * mm(Bd * L, E, HD) + 2 * mm(Bd * S, E, HD) + n_mlp * mm(Bd * L, E, F)
    dec_a = dec_self_a + 2 * mm(Bd * L, S, HD)
    logits = mm(Bd * L, E, V)
    w = cfg.num_encoder_layers * enc_w + cfg.num_decoder_layers * dec_w + logits
    a = cfg.num_encoder_layers * enc_a + cfg.num_decoder_layers * dec_a
    if mode is None:
        return w + a
    if mode == "model":
        return 3 * (w + a)
    if mode == "prompt":
        # Decoder layer 0 before its cross-attention sees only the targets: no gradient
        # through its self-attention and cross-attention query, nor d(query) of its scores.
        no_grad_w = dec_self_w + mm(Bd * L, E, HD)
        no_grad_a = 2 * dec_self_a + mm(Bd * L, S, HD)
        return w + a + (w - no_grad_w) + 2 * a - no_grad_a
    raise ValueError(f"mode must be None, 'model' or 'prompt', got {mode!r}")


def jaxpr_matmul_flops(jaxpr: Any) -> float:
    """Matmul FLOPs of a traced program: 2 x output elements x contracted size, summed
    over every `dot_general` of `jaxpr` and its sub-jaxprs (a `scan` body counted
    `length` times; no `while` loops are expected). For the methods whose step
    `t5_matmul_flops` does not model (P-tuning's LSTM, deep prompts)."""
    import math

    import jax

    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            raise ValueError("jaxpr_matmul_flops: a while loop has no static trip count")
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[d] for d in lhs_contract)
        times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += times * jaxpr_matmul_flops(sub)
    return total


# ---------------------------------------------------------------- data


def random_tokens(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> np.ndarray:
    """Ids in [2, min(vocab, 32000)): no padding (0) and no EOS (1)."""
    return rng.integers(2, min(vocab, 32000), shape).astype(np.int32)


def train_batch(batch: int, input_length: int, target_length: int, vocab: int,
                seed: int = 0) -> dict[str, np.ndarray]:
    """seqio's features: full-length inputs ending in EOS, targets ending in EOS."""
    rng = np.random.default_rng(seed)
    enc = random_tokens(rng, (batch, input_length), vocab)
    tgt = random_tokens(rng, (batch, target_length), vocab)
    enc[:, -1] = tgt[:, -1] = 1
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec,
            "decoder_target_tokens": tgt}


# ---------------------------------------------------------------- tables


def select_variants(specs: dict[str, dict[str, Any]], variants: str | None
                    ) -> dict[str, dict[str, Any]]:
    """The specs `--variants` (comma-separated) names, in the scripts' order; all if None."""
    if not variants:
        return specs
    keep = variants.split(",")
    unknown = set(keep) - set(specs)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {sorted(specs)}")
    return {k: v for k, v in specs.items() if k in keep}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (readable as plain text too)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    fmt = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in cells])


def dtypes(spec: dict[str, Any]) -> str:
    """'f32/bf16': the frozen weights' and the activations' dtypes."""
    short = {"float32": "f32", "bfloat16": "bf16"}
    return f"{short[spec['param_dtype']]}/{short[spec['dtype']]}"


def mib(n: int | float | None) -> str:
    return "n/a" if n is None else f"{n / MIB:,.0f}"


def spread(times: Sequence[float]) -> str:
    return f"{min(times):.2f}–{max(times):.2f}"


def per_round(num: Worker, den: Worker) -> str:
    """Range over rounds of num's step time / den's (steps of one round ran back to back)."""
    r = [a / b for a, b in zip(num.times, den.times, strict=True)]
    return f"per round {min(r):.2f}–{max(r):.2f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
