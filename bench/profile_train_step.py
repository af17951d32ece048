"""Where a prompt_jax train step spends its time: `jax.profiler` per-HLO-op times.

    python bench/profile_train_step.py                    # small, prompt tuning, dropout 0.1
    python bench/profile_train_step.py --trainable model --dropout 0
    python bench/profile_train_step.py --peft             # the PEFT step, torch.profiler

Builds the step exactly as `train_throughput.py` does, warms it up, traces `--steps`
steps with `jax.profiler` (perfetto trace of the XLA CPU thunks), and attributes each
HLO op's time to a category by the JAX source op that produced it (the `op_name`
metadata of the compiled HLO, which `--hlo FILE` also writes out). Times are summed
over XLA's threads (core-seconds), so shares are of the CPU work, not of wall time.
With `--peft`, the HF PEFT step of `train_throughput.py` under `torch.profiler`: self
time of each aten op on the calling thread (its intra-op threads work inside it).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import common
import train_throughput

# First match wins; tested against "<hlo name> <op_name>".
CATEGORIES = (
    ("dropout (random bits + mask)", r"Dropout|random_bits|threefry|random_bernoulli|rng"),
    ("matmul", r"^(dot|convolution)\b|\[has dot\]"),
    ("optimizer", r"adafactor|optax|scale_by|clip|apply_updates|global_norm"),
    ("loss + logits softmax", r"cross_entropy|log_softmax|take_along_axis|logsumexp|losses"),
    ("attention softmax/mask/bias", r"attention.*(softmax|exp|select_n|reduce_max|reduce_sum|"
                                     r"add|where|div)|relpos"),
    ("layer norm", r"layer_norm|encoder_norm|decoder_norm|rsqrt"),
    ("MLP activation", r"mlp.*(gelu|tanh|mul|pow)"),
    ("copy/transpose/layout", r"^(copy|transpose|bitcast|wrapped_transpose)|transpose"),
)


def categorize(text: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, text):
            return name
    return "other elementwise"


def op_names(hlo: str) -> dict[str, str]:
    """HLO instruction name -> the JAX op_name in its metadata, + " [has dot]" for a fusion
    whose fused computation contains a dot (XLA CPU fuses elementwise work into matmuls)."""
    bodies, current = collections.defaultdict(str), None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            current = head.group(1)
        elif current:
            bodies[current] += line + "\n"
    out = {}
    for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$', hlo, re.M):
        name = re.search(r'op_name="([^"]*)"', m.group(2))
        calls = re.search(r"calls=%?([\w.\-]+)", m.group(2))
        dot = calls and re.search(r" (dot|convolution)\(", bodies.get(calls.group(1), ""))
        out[m.group(1)] = (name.group(1) if name else "") + (" [has dot]" if dot else "")
    return out


def op_times(trace_dir: str) -> dict[str, float]:
    """HLO op -> summed duration in seconds over all threads, from the perfetto trace."""
    (path,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    times: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            times[e["args"]["hlo_op"]] += e["dur"] * 1e-6
    return times


TORCH_CATEGORIES = (
    ("dropout (random bits + mask)", r"bernoulli|dropout"),
    ("matmul", r"^aten::(mm|bmm|addmm|matmul|linear|baddbmm)$"),
    ("optimizer", r"Optimizer|adafactor"),
)


def profile_peft(spec: dict, steps: int, top: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    run_once, _ = train_throughput.setup_peft(dict(spec, threads=common.cores()))
    run_once()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            run_once()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) * 1e-6
    by_cat: dict[str, float] = collections.Counter()
    for e in events:
        name = next((c for c, pat in TORCH_CATEGORIES if re.search(pat, e.key)),
                    "other (elementwise, copies, norms, softmax, ...)")
        by_cat[name] += e.self_cpu_time_total * 1e-6
    print(f"PEFT step: wall {wall / steps:.2f} s/step, CPU {cpu / steps:.2f} s/step "
          f"(all threads), op self time {total / steps:.2f} s/step (calling thread)")
    print(common.table(["category", "s/step", "share"],
                       [[c, f"{t / steps:.2f}", f"{100 * t / total:.0f}%"]
                        for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])]))
    print()
    rows = [[e.key, e.count // steps, f"{e.self_cpu_time_total * 1e-6 / steps:.3f}",
             f"{100 * e.self_cpu_time_total * 1e-6 / total:.1f}%"]
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]
    print(common.table(["aten op", "calls/step", "s/step", "share"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(common.SIZES), default="small")
    p.add_argument("--trainable", choices=("prompt", "model"), default="prompt")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input-length", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--target-length", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--param-dtype", default="float32")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--hlo", default="", help="write the compiled HLO text here")
    p.add_argument("--peft", action="store_true", help="profile the HF PEFT step instead")
    p.add_argument("--ynn", action="store_true",
                   help="XLA's CPU defaults (YNNPACK fusions on) instead of the CLI's flags")
    args = p.parse_args()

    if args.ynn:
        os.environ["PROMPT_JAX_CPU_YNN"] = "1"
    from prompt_jax import cli

    cli.set_cpu_xla_flags()  # as `prompt-jax` runs, before JAX's backend starts
    import jax

    prompt = args.prompt_length if args.trainable == "prompt" else 0
    spec = dict(size=args.size, batch=args.batch, target_length=args.target_length,
                dropout=args.dropout, seed=0, dtype=args.dtype, param_dtype=args.param_dtype,
                prompt_length=prompt, trainable=args.trainable,
                input_length=args.input_length + args.prompt_length - prompt)
    if args.peft:
        if args.trainable != "prompt":
            raise SystemExit("--peft profiles PEFT prompt tuning only")
        profile_peft(spec, args.steps, args.top)
        return
    compiled, run_once, info = train_throughput.build_jax_step(spec)
    hlo = compiled.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    run_once()
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            run_once()
        wall = (time.perf_counter() - t0) / args.steps
        cpu = (time.process_time() - c0) / args.steps
        jax.profiler.stop_trace()
        times = op_times(trace_dir)
    names = op_names(hlo)
    total = sum(times.values())
    by_cat: dict[str, float] = collections.Counter()
    for op, t in times.items():
        by_cat[categorize(f"{op} {names.get(op, '')}")] += t
    print(f"{args.size}, {args.trainable} tuning, dropout {args.dropout}, "
          f"{args.param_dtype}/{args.dtype}: wall {wall:.2f} s/step, CPU {cpu:.2f} s/step "
          f"(all threads), op time summed over "
          f"threads {total / args.steps:.2f} s/step, XLA {info['xla_flops'] / 1e9:,.0f} GFLOP")
    print(common.table(["category", "s/step", "share"],
                       [[c, f"{t / args.steps:.2f}", f"{100 * t / total:.0f}%"]
                        for c, t in sorted(by_cat.items(), key=lambda kv: -kv[1])]))
    print()
    rows = [[op, f"{t / args.steps:.3f}", f"{100 * t / total:.1f}%", names.get(op, "")[-90:]]
            for op, t in sorted(times.items(), key=lambda kv: -kv[1])[: args.top]]
    print(common.table(["HLO op", "s/step", "share", "JAX op_name"], rows))


if __name__ == "__main__":
    main()
