"""Training throughput and memory: prompt_jax prompt tuning vs model tuning vs HF PEFT.

    python bench/train_throughput.py                      # T5 1.1 small shapes, fp32
    python bench/train_throughput.py --bf16               # + frozen weights in bf16
    python bench/train_throughput.py --methods            # + P-tuning, deep prompts, prefix
    python bench/train_throughput.py --size base

Same batch on every side (random weights, random token ids, no padding): batch 32,
inputs 128 + prompt 100, targets 8. Variants:
  jax-prompt   prompt_jax prompt tuning: `train_step.make_train_step`, `optim.adafactor()`
               on the prompt only, jitted with the train state donated;
  jax-model    prompt_jax model tuning on the same token count: no prompt, inputs 228,
               every weight trainable (`optim.MODEL_TUNING`), same Adafactor;
  peft-prompt  HF `T5ForConditionalGeneration` + PEFT `PromptTuningConfig(num_virtual_tokens
               =100)`, `transformers.optimization.Adafactor(lr=0.3, scale_parameter=False,
               relative_step=False)` on the prompt (the only tensor with requires_grad);
  with --bf16: jax-prompt-bf16w (frozen weights stored bf16, activations fp32) and
               jax-prompt-bf16 (weights and activations bf16; the prompt stays fp32);
  with --ynn:  jax-prompt-ynn, jax-model-ynn: the same steps with XLA's CPU defaults
               (YNNPACK fusions on), which `prompt-jax` turns off on jaxlib 0.10
               (`prompt_jax.cli.CPU_YNN_FLAG`; the jax-* variants run as the CLI does);
  with --backends: jax-prompt-<b>, jax-model-<b> for each XLA CPU backend choice b of
               `common.BACKENDS` (xla: XLA's defaults; onednn, onednn-ynn: oneDNN with the
               YNN fusions off / on; xnnpack; noconc: the concurrency-optimized scheduler
               off), each worker started with exactly those XLA_FLAGS;
  with --dropout-impls: jax-prompt-flaxdrop, jax-model-flaxdrop: the same steps with flax's
               nn.Dropout masks (`ModelSpec.dropout_impl='flax'`, a 32-bit uniform per
               element) instead of the default packed 16-bit draws (`t5.layers.PackedDropout`);
  with --methods: the other prompt methods, P = --prompt-length virtual tokens each, the
               same inputs (P-tuning prepends its P soft tokens), Adafactor scaled by each
               parameter's RMS on both sides (as their gin files set; HF
               `scale_parameter=True`), the optimizer on the method's tensors only:
    jax-p-tuning        methods/p_tuning.gin: P soft tokens from a bi-LSTM (2 layers, hidden
                        d_model) + MLP prompt encoder, prepended (`PromptEncoderSpec('lstm')`);
    peft-p-tuning       PEFT `PromptEncoderConfig(encoder_reparameterization_type='LSTM')`, the
                        same hidden size and layers (PEFT runs its encoder over 2P inputs on a
                        seq2seq model and uses the first P);
    jax-p-tuning-v2     methods/p_tuning_v2.gin: key/value prefixes in every encoder layer's
                        self-attention (`DeepPromptSpec('p_tuning_v2')`; PEFT has no equivalent
                        on T5: its prefix tuning is the next one);
    jax-prefix-tuning   methods/prefix_tuning.gin: prefixes in the decoder's self-attention as
                        PEFT places them (`DeepPromptSpec('prefix_tuning')`);
    peft-prefix-tuning  PEFT `PrefixTuningConfig` (no prefix projection).
Dropout 0.1 on both sides (the paper's setting; `--dropout`). A step is forward +
backward + optimizer update, synchronised (`jax.block_until_ready`; torch on CPU is
synchronous). Examples/s = batch / median step time. See `common.py` for the rounds,
the memory columns and the FLOP count (for the --methods rows: the dot_generals of the
traced jax step, `common.jaxpr_matmul_flops`; a peft row shows its jax counterpart's).
"""

from __future__ import annotations

import os
import time
from typing import Any

import common


def _config(spec: dict[str, Any]):
    from prompt_jax.t5 import get_config

    return get_config(common.SIZES[spec["size"]], dropout_rate=spec["dropout"],
                      dtype=spec["dtype"], param_dtype=spec["param_dtype"],
                      dropout_impl=spec.get("dropout_impl", "packed"))


def _count(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))


def build_jax_step(spec: dict[str, Any]):
    """-> (compiled step, run_once, info) for a prompt_jax variant."""
    import flax
    import jax
    import numpy as np

    from prompt_jax import optim, partitioning, train_step

    cfg = _config(spec)
    model = _jax_model(spec, cfg)
    batch = common.train_batch(spec["batch"], spec["input_length"], spec["target_length"],
                               cfg.vocab_size, spec["seed"])
    one = {k: v[:1] for k, v in batch.items()}
    params = jax.jit(model.init)(jax.random.PRNGKey(spec["seed"]), one["encoder_input_tokens"],
                                 one["decoder_input_tokens"])["params"]
    params = jax.tree.map(np.asarray, flax.linen.unbox(params))
    regexes = optim.DEFAULT_TRAINABLE if spec["trainable"] == "prompt" else optim.MODEL_TUNING
    tx = optim.adafactor(multiply_by_parameter_scale=spec.get("scale_param", False))
    # As the train job builds and compiles it, on a one-device mesh.
    mesh = partitioning.make_mesh((1, 1), jax.devices()[:1])
    state, frozen, shardings = train_step.initial_state(mesh, model, params, regexes, tx)
    trainable = state.trainable
    step_fn = train_step.make_train_step(model, tx)
    # The methods' matmuls, counted on the traced step (t5_matmul_flops models prompt and
    # model tuning only).
    traced_flops = (common.jaxpr_matmul_flops(jax.make_jaxpr(step_fn)(state, frozen, batch).jaxpr)
                    if spec.get("method", "prompt") != "prompt" else None)
    step = train_step.jit_train_step(step_fn, mesh, shardings)
    batch = partitioning.global_batch(batch, mesh)  # on the device once, outside the step
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    box = {"state": state}

    def run_once():
        box["state"], metrics = compiled(box["state"], frozen, batch)
        jax.block_until_ready((box["state"], metrics))

    info = {"compile_s": compile_s, "xla_flops": cost.get("flops"),
            "xla_temp": mem.temp_size_in_bytes, "xla_args": mem.argument_size_in_bytes,
            "trainable": _count(trainable), "frozen": _count(frozen),
            "traced_flops": traced_flops}
    return compiled, run_once, info


def _jax_model(spec: dict[str, Any], cfg):
    """The T5 of a variant's method, as `prompt_jax.train` builds it."""
    from prompt_jax.methods.deep_prompts import DeepPromptSpec
    from prompt_jax.methods.p_tuning import PromptEncoderSpec
    from prompt_jax.t5 import T5

    method = spec.get("method", "prompt")
    if method == "p_tuning":
        return T5(cfg, prompt_length=spec["prompt_length"], prompt_encoder=PromptEncoderSpec(
            "lstm", spec["encoder_hidden"], spec["encoder_layers"]))
    model = T5(cfg, prompt_length=spec["prompt_length"])
    if method in ("p_tuning_v2", "prefix_tuning"):
        model = model.clone(deep_prompt_spec=DeepPromptSpec(method, spec["virtual_tokens"]))
    return model


def setup_jax(spec: dict[str, Any]):
    _, run_once, info = build_jax_step(spec)
    return run_once, info


def setup_peft(spec: dict[str, Any]):
    import numpy as np
    import peft
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.optimization import Adafactor

    from prompt_jax.checkpoints.hf import config_to_hf

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    cfg = _config(spec)
    model = T5ForConditionalGeneration(T5Config(**config_to_hf(cfg)))
    # transformers 5 always ties lm_head to the input embedding (T5 1.1 unties them);
    # untie so that both sides hold the same weights. It changes no FLOP.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    method = spec.get("method", "prompt")
    task = dict(task_type=TaskType.SEQ_2_SEQ_LM)
    if method == "prompt":
        peft_config = PromptTuningConfig(**task, num_virtual_tokens=spec["prompt_length"])
    elif method == "p_tuning":
        peft_config = peft.PromptEncoderConfig(
            **task, num_virtual_tokens=spec["prompt_length"],
            encoder_reparameterization_type="LSTM",
            encoder_hidden_size=spec["encoder_hidden"] or cfg.d_model,
            encoder_num_layers=spec["encoder_layers"])
    elif method == "prefix_tuning":
        # PEFT's default token_dim is d_model; T5 1.1's attention is H*D wide (384 != 512 in
        # small), the width our deep prompt and `checkpoints.peft` use.
        peft_config = peft.PrefixTuningConfig(
            **task, num_virtual_tokens=spec["virtual_tokens"], num_attention_heads=cfg.num_heads,
            token_dim=cfg.num_heads * cfg.d_kv)
    else:
        raise ValueError(f"PEFT has no {method} variant")
    model = get_peft_model(model, peft_config)
    grads = [n for n, p in model.named_parameters() if p.requires_grad]
    expected = ["prompt_encoder.default.embedding.weight"] if method == "prompt" else grads
    if not grads or grads != expected or not all(n.startswith("prompt_encoder.default.")
                                                 for n in grads):
        raise RuntimeError(f"PEFT: parameters with requires_grad besides the {method} "
                           f"tensors: {grads}")
    base = model.get_base_model()
    if base.lm_head.weight.data_ptr() == base.shared.weight.data_ptr():
        raise RuntimeError("PEFT: lm_head is tied to the embedding again")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = Adafactor(trainable, lr=0.3, scale_parameter=spec.get("scale_param", False),
                    relative_step=False,
                    warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, weight_decay=1e-5)
    batch = common.train_batch(spec["batch"], spec["input_length"], spec["target_length"],
                               cfg.vocab_size, spec["seed"])
    ids = torch.from_numpy(batch["encoder_input_tokens"]).long()
    mask = torch.ones_like(ids)
    labels = torch.from_numpy(batch["decoder_target_tokens"]).long()
    model.train()

    def run_once():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    peaks = []
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        peaks.append(2 * n**3 / (time.perf_counter() - t0))
    info = {"trainable": sum(p.numel() for p in trainable),
            "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad),
            "torch_threads": torch.get_num_threads(),
            "torch_matmul_peak": float(np.median(peaks)), "trainable_names": grads}
    return run_once, info


PEFT_METHODS = ("p-tuning", "prefix-tuning")  # p_tuning_v2 (encoder prefixes): none on T5


def variants(args) -> dict[str, dict[str, Any]]:
    common_spec = dict(size=args.size, batch=args.batch, target_length=args.target_length,
                       dropout=args.dropout, warmup=args.warmup, threads=common.cores(),
                       seed=0, dtype="float32", param_dtype="float32")
    prompt = dict(common_spec, prompt_length=args.prompt_length, input_length=args.input_length,
                  trainable="prompt")
    model = dict(common_spec, prompt_length=0,
                 input_length=args.input_length + args.prompt_length, trainable="model")
    out = {"jax-prompt": dict(prompt, kind="jax"), "jax-model": dict(model, kind="jax"),
           "peft-prompt": dict(prompt, kind="peft")}
    if args.bf16:
        out["jax-prompt-bf16w"] = dict(prompt, kind="jax", param_dtype="bfloat16")
        out["jax-prompt-bf16"] = dict(prompt, kind="jax", param_dtype="bfloat16",
                                      dtype="bfloat16")
    if args.ynn:
        out["jax-prompt-ynn"] = dict(prompt, kind="jax", ynn=True)
        out["jax-model-ynn"] = dict(model, kind="jax", ynn=True)
    if args.dropout_impls:
        out["jax-prompt-flaxdrop"] = dict(prompt, kind="jax", dropout_impl="flax")
        out["jax-model-flaxdrop"] = dict(model, kind="jax", dropout_impl="flax")
    if args.methods:
        # As methods/*.gin: Adafactor scaled by parameter RMS; P virtual tokens everywhere.
        method = dict(prompt, scale_param=True, virtual_tokens=args.prompt_length,
                      encoder_hidden=None, encoder_layers=2)
        deep = dict(method, prompt_length=0)
        for name, spec in (("p-tuning", dict(method, method="p_tuning")),
                           ("p-tuning-v2", dict(deep, method="p_tuning_v2")),
                           ("prefix-tuning", dict(deep, method="prefix_tuning"))):
            out["jax-" + name] = dict(spec, kind="jax")
            if name in PEFT_METHODS:
                out["peft-" + name] = dict(spec, kind="peft")
    if args.backends:
        for name in ("jax-prompt", "jax-model"):
            for backend, flags in common.BACKENDS.items():
                out[f"{name}-{backend}"] = dict(out[name], xla_flags=flags)
    return common.select_variants(out, args.variants)


def _model_flops(cfg, name: str, spec: dict[str, Any], workers) -> float | None:
    """Matmul FLOPs of a variant's step: `t5_matmul_flops` for prompt and model tuning, the
    traced jax step's for the methods (a peft row: its jax counterpart's; None without one)."""
    if spec.get("method", "prompt") == "prompt":
        return common.t5_matmul_flops(cfg, spec["batch"], spec["prompt_length"]
                                      + spec["input_length"], spec["target_length"],
                                      spec["trainable"])
    jax_name = "jax-" + name.removeprefix("peft-").removeprefix("jax-")
    return workers[jax_name].info["traced_flops"] if jax_name in workers else None


def _method_ratios(workers, per_s: dict[str, float]) -> None:
    """The --methods ratios: prompt_jax / PEFT per method, and each method / prompt tuning
    on its own side (examples/s; XLA temp memory for the jax side)."""
    names = [n for n in ("p-tuning", "p-tuning-v2", "prefix-tuning") if f"jax-{n}" in per_s]
    for n in names:
        jax_n, peft_n = f"jax-{n}", f"peft-{n}"
        if peft_n in per_s:
            r = per_s[jax_n] / per_s[peft_n]
            print(f"  {f'{jax_n} / {peft_n} examples/s':<51}{r:5.2f}  "
                  f"(inverse step-time {common.per_round(workers[peft_n], workers[jax_n])})")
    for side in ("jax", "peft"):
        base = f"{side}-prompt"
        for n in names:
            name = f"{side}-{n}"
            if base not in per_s or name not in per_s:
                continue
            r = per_s[name] / per_s[base]
            extra = ""
            if side == "jax":
                temp = workers[name].info["xla_temp"] / workers[base].info["xla_temp"]
                extra = f"; XLA temp {temp:.2f}x"
            print(f"  {f'{name} / {base} examples/s':<51}{r:5.2f}  "
                  f"(inverse step-time {common.per_round(workers[base], workers[name])}"
                  f"{extra})")


def report(args, specs, workers, peak: common.MatmulPeak) -> None:
    from prompt_jax.t5 import get_config

    cfg = get_config(common.SIZES[args.size])
    rows, per_s, achieved, per_cpu = [], {}, {}, {}
    for name, w in workers.items():
        spec, info = specs[name], w.info
        flops = _model_flops(cfg, name, spec, workers)
        per_s[name] = spec["batch"] / w.median
        if flops is not None:
            achieved[name] = flops / w.median / peak.flops_per_s(spec["dtype"])
            per_cpu[name] = flops / w.cpu_median / peak.flops_per_cpu_s(spec["dtype"])
        na = flops is None
        rows.append([
            name, common.dtypes(spec), f"{info['trainable']:,}", f"{w.median:.2f}",
            common.spread(w.times), f"{w.cpu_median:.1f}", f"{per_s[name]:.2f}",
            "n/a" if na else f"{flops / 1e9:,.0f}",
            f"{info['xla_flops'] / 1e9:,.0f}" if info.get("xla_flops") else "n/a",
            "n/a" if na else f"{flops / w.median / 1e9:.1f}",
            "n/a" if na else f"{100 * achieved[name]:.0f}%",
            "n/a" if na else f"{100 * per_cpu[name]:.0f}%", common.mib(info.get("xla_temp")),
            common.mib(info["step_delta_rss"]), common.mib(info["peak_rss"])])
    print()
    print(common.table(
        ["variant", "weights/acts", "trainable", "step s (median)", "min–max", "CPU s",
         "examples/s", "model GFLOP", "XLA GFLOP", "GFLOP/s", "% of peak",
         "% of peak per CPU-s", "XLA temp MiB", "step ΔRSS MiB", "peak RSS MiB"], rows))
    print("\n" + peak.describe())
    if "peft-prompt" in workers:
        info = workers["peft-prompt"].info
        print(f"torch {info['torch_threads']} threads, fp32 2048^3 matmul "
              f"{info['torch_matmul_peak'] / 1e9:.1f} GFLOP/s (at its set-up); PEFT trainable: "
              f"{info['trainable_names']} ({info['trainable']:,} = 2 x {args.prompt_length} "
              "rows: PEFT allocates a prompt per transformer submodule of a seq2seq model)")
    if any(specs[n].get("method", "prompt") != "prompt" for n in workers):
        print("model GFLOP of the method rows: the dot_generals of the traced jax step "
              "(common.jaxpr_matmul_flops); a peft row shows its jax counterpart's")
    for name in ("peft-p-tuning", "peft-prefix-tuning"):
        if name in workers:
            print(f"{name} trainable: {workers[name].info['trainable_names']}")
    for name, w in workers.items():
        if "compile_s" in w.info:
            print(f"{name}: compile {w.info['compile_s']:.1f} s (untimed)")
    print("\nratios of medians (targets are benchmarks, not timed tests):")
    if {"jax-prompt", "peft-prompt"} <= set(per_s):
        r = per_s["jax-prompt"] / per_s["peft-prompt"]
        print(f"  prompt_jax / PEFT examples/s             {r:5.2f}  target >= 2.00  "
              f"{common.verdict(r >= 2.0)}  (inverse step-time "
              f"{common.per_round(workers['peft-prompt'], workers['jax-prompt'])})")
    if {"jax-prompt", "jax-model"} <= set(per_s):
        r = workers["jax-prompt"].median / workers["jax-model"].median
        enc = args.prompt_length + args.input_length
        fr = (common.t5_matmul_flops(cfg, args.batch, enc, args.target_length, "prompt")
              / common.t5_matmul_flops(cfg, args.batch, enc, args.target_length, "model"))
        print(f"  prompt step / model step (equal tokens)  {r:5.2f}  target <= 0.72  "
              f"{common.verdict(r <= 0.72)}  (matmul FLOP ratio {fr:.2f}; "
              f"{common.per_round(workers['jax-prompt'], workers['jax-model'])})")
    if "jax-prompt" in achieved:
        r = achieved["jax-prompt"]
        print(f"  jax-prompt FLOP/s / fp32 matmul peak     {r:5.2f}  target >= 0.50  "
              f"{common.verdict(r >= 0.5)}  (per CPU-second: {per_cpu['jax-prompt']:.2f})")
    if {"jax-prompt-ynn", "jax-model-ynn"} <= set(per_s):
        r = workers["jax-prompt-ynn"].median / workers["jax-model-ynn"].median
        print(f"  ynn prompt step / model step             {r:5.2f}  "
              f"({common.per_round(workers['jax-prompt-ynn'], workers['jax-model-ynn'])})")
    backends = [f"{n}-{b}" for n in ("jax-prompt", "jax-model") for b in common.BACKENDS]
    for name in ("jax-prompt-bf16w", "jax-prompt-bf16", "jax-prompt-ynn", "jax-prompt-flaxdrop",
                 "jax-model-flaxdrop", *backends):
        base = "jax-model" if name.startswith("jax-model") else "jax-prompt"
        if name in per_s and base in per_s:
            r = per_s[name] / per_s[base]
            extra = (f"; / PEFT {per_s[name] / per_s['peft-prompt']:.2f}"
                     if "peft-prompt" in per_s and base == "jax-prompt" else "")
            print(f"  {name} / {base} examples/s{' ' * max(1, 22 - len(name))}{r:5.2f}"
                  f"  ({common.per_round(workers[base], workers[name])} inverse{extra})")
    _method_ratios(workers, per_s)
    load = os.getloadavg()
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in load))


def main() -> None:
    p = common.parser(__doc__.split("\n")[0], "step")
    p.add_argument("--target-length", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--methods", action="store_true",
                   help="add the P-tuning, P-tuning v2 and prefix tuning variants (jax, peft)")
    p.add_argument("--dropout-impls", action="store_true",
                   help="add jax-prompt-flaxdrop, jax-model-flaxdrop (flax's dropout masks)")
    args = p.parse_args()

    info = common.machine_info()
    common.print_machine(info)
    print(f"T5 1.1 {args.size} shapes, random weights; batch {args.batch}, inputs "
          f"{args.input_length} + prompt {args.prompt_length}, targets {args.target_length}; "
          f"dropout {args.dropout} on both sides; {args.warmup} warm-up step(s), "
          f"{args.repeats} timed round(s)", flush=True)
    specs = variants(args)
    workers, peak = common.measure(__file__, specs, args.repeats, args.matmul_size)
    report(args, specs, workers, peak)


if __name__ == "__main__":
    common.entry(main, {"jax": setup_jax, "peft": setup_peft})
