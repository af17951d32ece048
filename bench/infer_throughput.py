"""Rank-classification throughput: prompt_jax serving vs HF PEFT, and a 5-prompt ensemble
in one pass vs 5 separate passes.

    python bench/infer_throughput.py                      # T5 1.1 small shapes, fp32
    python bench/infer_throughput.py --size base --bf16
    python bench/infer_throughput.py --decode --prompt-length 20 --variants \
        jax-greedy,jax-greedy-nocross,peft-generate               # greedy decoding only

RTE-like batch (random weights, random input ids): `--batch` 32 examples of 128 input
tokens + a 100-token prompt, 2 candidate targets "entailment" / "not_entailment"
(T5 SentencePiece ids + EOS, from the repository's demo vocabulary). Each candidate is
scored by its summed token log-likelihood; the prediction is the argmax. Variants:
  jax-rank          `serving.rank_classify(model, params, inputs, candidates, prompt)`:
                    each example encoded once, the decoder run on B x C rows;
  peft-rank         the same work with HF + PEFT `PromptTuningConfig`: PEFT's own
                    prompt prepended as its `forward` does, the encoder once, the decoder
                    on B x C rows, log-softmax + gather (torch.inference_mode);
  peft-rank-percand what a PEFT user writes first: one `model(input_ids,
                    decoder_input_ids=candidate)` per candidate (the encoder C times);
  jax-ens-1pass     `serving.ensemble_rank_classify` with 5 prompts: B_e x 5 rows in one
                    pass (`--ensemble-batch` B_e examples, default 8);
  jax-ens-5pass     5 calls of `serving.rank_classify`, one per prompt, on the same B_e.
  with --bf16:      jax-rank-bf16w (frozen weights bf16) and jax-rank-bf16 (weights and
                    activations bf16);
  with --ynn:       jax-rank-ynn: jax-rank with XLA's CPU defaults (YNNPACK fusions on;
                    the jax-* variants run with the XLA flags `prompt-jax` sets).
  with --decode:    greedy decoding of `--decode-length` L tokens for the same batch and
                    prompt, every row run to L tokens (EOS never ends a row):
    jax-greedy          `decoding.greedy_decode(..., prefix_embeddings=prompt)`; the
                        cross-attention keys and values made once, in `init_cache`;
    jax-greedy-nocross  the same loop as before that cache: each step is handed the cache
                        without its cross-attention entries, so every step projects the
                        encoder output again (what `DecoderLayer` did at every step);
    peft-generate       HF + PEFT `PromptTuningConfig`: `model.generate(max_new_tokens=L,
                        min_new_tokens=L, num_beams=1, do_sample=False)` (its KV cache on);
    jax-steps, jax-steps-nocross  the same two, with the steps called one by one from Python
                        (a jitted `decoding.decode_step` + argmax per token, as a server
                        that schedules steps does). Inside one compiled loop XLA hoists the
                        loop-invariant projections of the encoder output out of the loop
                        by itself, so only step by step does nocross pay for them each step.
Examples/s = examples / median call time (ensembles: B_e examples, each under 5 prompts);
decoding: tokens/s = B x L / median call time.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import common

LABELS = ("entailment", "not_entailment")
VOCAB = pathlib.Path(__file__).resolve().parents[1] / "prompt_jax" / "demo_data" / "spiece.model"
# `LABELS` under the T5 vocabulary, for when sentencepiece is not installed.
LABEL_IDS = ([3, 35, 5756, 297], [59, 834, 35, 5756, 297])
DECODE_MODES = ("greedy", "greedy-nocross", "generate", "steps", "steps-nocross")
NO_EOS = -1  # an id no token has: greedy decoding runs every row to the full length


def candidates():
    """[C, L] int32: the label strings' ids + EOS (1), right-padded with 0."""
    import numpy as np

    try:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(VOCAB))
        ids = [sp.encode(label) for label in LABELS]
    except ImportError:
        ids = [list(x) for x in LABEL_IDS]
    length = max(len(x) for x in ids) + 1
    out = np.zeros((len(ids), length), np.int32)
    for c, x in enumerate(ids):
        out[c, : len(x) + 1] = x + [1]
    return out


def _inputs(spec: dict[str, Any], vocab: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(spec["seed"])
    tokens = common.random_tokens(rng, (batch, spec["input_length"]), vocab)
    tokens[:, -1] = 1
    return tokens


def _config(spec: dict[str, Any]):
    from prompt_jax.t5 import get_config

    return get_config(common.SIZES[spec["size"]], dtype=spec["dtype"],
                      param_dtype=spec["param_dtype"])


def setup_jax(spec: dict[str, Any]):
    import flax
    import jax
    import jax.numpy as jnp

    from prompt_jax import decoding, prompts, serving
    from prompt_jax.t5 import T5

    cfg = _config(spec)
    model = T5(cfg)  # frozen model; prompts arrive as prefix embeddings
    one = jnp.ones((1, 2), jnp.int32)
    params = flax.linen.unbox(jax.jit(model.init)(jax.random.PRNGKey(spec["seed"]), one,
                                                  one)["params"])
    num = spec["num_prompts"]
    prompt_set = prompts.random_uniform()(jax.random.PRNGKey(1),
                                          (num, spec["prompt_length"], cfg.d_model))
    tokens = jnp.asarray(_inputs(spec, cfg.vocab_size, spec["batch"]))
    targets = jnp.asarray(candidates())

    length = spec.get("decode_length", 0)
    if spec["mode"] == "rank":
        def run_once():
            jax.block_until_ready(serving.rank_classify(model, params, tokens, targets,
                                                        prompt_set[0]))
    elif spec["mode"] == "greedy":
        def run_once():
            jax.block_until_ready(decoding.greedy_decode(model, params, tokens, length,
                                                         prompt_set[0], eos_id=NO_EOS))
    elif spec["mode"] == "greedy-nocross":
        recomputing = jax.jit(_greedy_recomputing_cross, static_argnums=(0, 3))

        def run_once():
            jax.block_until_ready(recomputing(model, params, tokens, length, prompt_set[0]))
    elif spec["mode"] in ("steps", "steps-nocross"):
        strip = _without_cross if spec["mode"] == "steps-nocross" else (lambda cache: cache)
        encode = jax.jit(lambda p, t, prefix: model.apply({"params": p}, t, prefix,
                                                          method=T5.encode))

        @jax.jit
        def step(p, cache, encoded, mask, previous):
            log_probs, cache = decoding.decode_step(model, p, strip(cache), encoded, mask,
                                                    previous)
            return strip(cache), jnp.argmax(log_probs, axis=-1).astype(jnp.int32)

        def run_once():
            encoded, mask = encode(params, tokens, prompt_set[0])
            cache = strip(decoding.init_cache(model, params, encoded, mask, length))
            token, out = jnp.zeros(tokens.shape[:1], jnp.int32), []
            for _ in range(length):
                cache, token = step(params, cache, encoded, mask, token)
                out.append(token)
            jax.block_until_ready(out)
    elif spec["mode"] == "ens-1pass":
        def run_once():
            serving.ensemble_rank_classify(model, params, tokens, targets, prompt_set)
    else:
        def run_once():
            jax.block_until_ready([serving.rank_classify(model, params, tokens, targets,
                                                         prompt_set[n]) for n in range(num)])
    return run_once, {}


def _without_cross(cache):
    """The decoding cache less its `cached_cross_*` entries: a decoding step handed it projects
    the encoder output into the cross-attention keys and values anew."""
    return {"decoder": {name: {k: v for k, v in layer.items()
                               if k != "encoder_decoder_attention"}
                        if isinstance(layer, dict) else layer
                        for name, layer in cache["decoder"].items()}}


def _greedy_recomputing_cross(model, params, tokens, length, prefix):
    """`decoding.greedy_decode` of `length` steps (no EOS) with the cross-attention keys and
    values recomputed at every step, as before they were cached -> tokens [B, length]."""
    import jax
    import jax.numpy as jnp

    from prompt_jax import decoding
    from prompt_jax.t5 import T5

    encoded, mask = model.apply({"params": params}, tokens, prefix, method=T5.encode)
    cache = _without_cross(decoding.init_cache(model, params, encoded, mask, length))

    def body(step, carry):
        cache, previous, out = carry
        log_probs, cache = decoding.decode_step(model, params, cache, encoded, mask, previous)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        return _without_cross(cache), token, out.at[:, step].set(token)

    start = (cache, jnp.zeros(tokens.shape[:1], jnp.int32),
             jnp.zeros((tokens.shape[0], length), jnp.int32))
    return jax.lax.fori_loop(0, length, body, start)[2]


def setup_peft(spec: dict[str, Any]):
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.modeling_outputs import BaseModelOutput

    from prompt_jax.checkpoints.hf import config_to_hf

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    cfg = _config(spec)
    base = T5ForConditionalGeneration(T5Config(**config_to_hf(cfg)))
    base.lm_head.weight = torch.nn.Parameter(base.shared.weight.detach().clone())  # untie (T5 1.1)
    model = get_peft_model(base, PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=spec["prompt_length"]))
    model.eval()
    batch, P = spec["batch"], spec["prompt_length"]
    ids = torch.from_numpy(_inputs(spec, cfg.vocab_size, batch)).long()
    mask = torch.ones_like(ids)
    targets = torch.from_numpy(candidates()).long()  # [C, L]
    C, L = targets.shape
    rows = targets.repeat(batch, 1)  # [B*C, L]: row b*C + c is example b, candidate c
    dec_in = torch.nn.functional.pad(rows[:, :-1], (1, 0))  # shifted right, 0 = start

    def summed_ll(logits, tgt):
        ll = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
        return torch.where(tgt > 0, ll, 0.0).sum(-1)

    if spec["mode"] == "generate":
        length = spec["decode_length"]

        def run_once():
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=length,
                               min_new_tokens=length, num_beams=1, do_sample=False)
    elif spec["mode"] == "rank":
        def run_once():
            with torch.inference_mode():
                # PEFT's forward for prompt tuning: prompt rows, then the input embeddings.
                emb = model.word_embeddings(ids)
                x = torch.cat([model.get_prompt(batch_size=batch)[:, :P].to(emb.dtype), emb], 1)
                m = torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], 1)
                enc = base.get_encoder()(inputs_embeds=x, attention_mask=m).last_hidden_state
                out = base(encoder_outputs=BaseModelOutput(enc.repeat_interleave(C, 0)),
                           attention_mask=m.repeat_interleave(C, 0), decoder_input_ids=dec_in)
                summed_ll(out.logits, rows).view(batch, C).argmax(-1)
    else:
        def run_once():
            with torch.inference_mode():
                scores = []
                for c in range(C):
                    tgt = targets[c].expand(batch, L)
                    logits = model(input_ids=ids, attention_mask=mask,
                                   decoder_input_ids=torch.nn.functional.pad(tgt[:, :-1],
                                                                             (1, 0))).logits
                    scores.append(summed_ll(logits, tgt))
                torch.stack(scores, -1).argmax(-1)
    return run_once, {"torch_threads": torch.get_num_threads()}


def variants(args) -> dict[str, dict[str, Any]]:
    base = dict(size=args.size, batch=args.batch, input_length=args.input_length,
                prompt_length=args.prompt_length, warmup=args.warmup, threads=common.cores(),
                seed=0, dtype="float32", param_dtype="float32", num_prompts=1)
    ens = dict(base, batch=args.ensemble_batch, num_prompts=args.num_prompts, kind="jax")
    out = {"jax-rank": dict(base, kind="jax", mode="rank"),
           "peft-rank": dict(base, kind="peft", mode="rank"),
           "peft-rank-percand": dict(base, kind="peft", mode="percand"),
           "jax-ens-1pass": dict(ens, mode="ens-1pass"),
           "jax-ens-5pass": dict(ens, mode="ens-npass")}
    if args.bf16:
        out["jax-rank-bf16w"] = dict(base, kind="jax", mode="rank", param_dtype="bfloat16")
        out["jax-rank-bf16"] = dict(base, kind="jax", mode="rank", param_dtype="bfloat16",
                                    dtype="bfloat16")
    if args.ynn:
        out["jax-rank-ynn"] = dict(base, kind="jax", mode="rank", ynn=True)
    if args.decode:
        dec = dict(base, decode_length=args.decode_length)
        out["jax-greedy"] = dict(dec, kind="jax", mode="greedy")
        out["jax-greedy-nocross"] = dict(dec, kind="jax", mode="greedy-nocross")
        out["peft-generate"] = dict(dec, kind="peft", mode="generate")
        out["jax-steps"] = dict(dec, kind="jax", mode="steps")
        out["jax-steps-nocross"] = dict(dec, kind="jax", mode="steps-nocross")
    return common.select_variants(out, args.variants)


def report(args, specs, workers, peak: common.MatmulPeak) -> None:
    from prompt_jax.t5 import get_config

    cfg = get_config(common.SIZES[args.size])
    C, L = candidates().shape
    rows, per_s = [], {}
    for name, w in workers.items():
        spec = specs[name]
        if spec["mode"] in DECODE_MODES:
            continue
        enc_rows = spec["batch"] * spec["num_prompts"]
        passes = C if spec["mode"] == "percand" else 1
        enc_b, dec_b = enc_rows * passes, enc_rows * C
        flops = common.t5_matmul_flops(cfg, enc_b, spec["prompt_length"] + spec["input_length"],
                                       L, None, dec_batch=dec_b)
        per_s[name] = spec["batch"] / w.median
        achieved = flops / w.median
        rows.append([name, common.dtypes(spec), spec["batch"],
                     f"{enc_b} x {dec_b}", f"{w.median:.2f}", common.spread(w.times),
                     f"{w.cpu_median:.1f}", f"{per_s[name]:.2f}", f"{flops / 1e9:,.0f}",
                     f"{achieved / 1e9:.1f}",
                     f"{100 * achieved / peak.flops_per_s(spec['dtype']):.0f}%",
                     f"{100 * flops / w.cpu_median / peak.flops_per_cpu_s(spec['dtype']):.0f}%",
                     f"{w.info['warmup_seconds'][0]:.1f}" if w.info["warmup_seconds"] else "n/a",
                     common.mib(w.info["step_delta_rss"]), common.mib(w.info["peak_rss"])])
    if rows:  # none where only decoding variants ran
        print()
        print(common.table(
            ["variant", "weights/acts", "examples", "encoder x decoder rows", "call s (median)",
             "min–max", "CPU s", "examples/s", "model GFLOP", "GFLOP/s", "% of peak",
             "% of peak per CPU-s", "first call s",
             "ΔRSS MiB", "peak RSS MiB"], rows))
        print(f"\ncandidates {LABELS} -> ids {candidates().tolist()}")
    print(peak.describe())
    if rows:
        print("\nratios of medians:")
    for other in ("peft-rank", "peft-rank-percand"):
        if {"jax-rank", other} <= set(per_s):
            print(f"  jax-rank / {other} examples/s{' ' * (18 - len(other))}"
                  f"{per_s['jax-rank'] / per_s[other]:5.2f}  (inverse call-time "
                  f"{common.per_round(workers[other], workers['jax-rank'])})")
    if {"jax-ens-1pass", "jax-ens-5pass"} <= set(per_s):
        r = workers["jax-ens-5pass"].median / workers["jax-ens-1pass"].median
        print(f"  ensemble of {args.num_prompts}: 1 pass speed-up over {args.num_prompts} "
              f"passes        {r:5.2f}  "
              f"({common.per_round(workers['jax-ens-5pass'], workers['jax-ens-1pass'])})")
    for name in ("jax-rank-bf16w", "jax-rank-bf16", "jax-rank-ynn"):
        if {name, "jax-rank"} <= set(per_s):
            print(f"  {name} / jax-rank examples/s{' ' * (16 - len(name))}"
                  f"{per_s[name] / per_s['jax-rank']:5.2f}  (inverse "
                  f"{common.per_round(workers['jax-rank'], workers[name])})")
    report_decoding(args, specs, workers)
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def report_decoding(args, specs, workers) -> None:
    """The greedy-decoding variants' table and ratios (tokens/s = B x L / call time)."""
    names = [n for n in workers if specs[n]["mode"] in DECODE_MODES]
    if not names:
        return
    tokens_per_s = {n: specs[n]["batch"] * specs[n]["decode_length"] / workers[n].median
                    for n in names}
    first = lambda w: f"{w.info['warmup_seconds'][0]:.2f}" if w.info["warmup_seconds"] else "n/a"
    print(f"\ngreedy decoding of {args.decode_length} tokens, batch {args.batch}, inputs "
          f"{args.input_length} + prompt {args.prompt_length}:")
    print(common.table(
        ["variant", "dtypes", "call s (median)", "min–max", "CPU s", "tokens/s", "first call s",
         "ΔRSS MiB", "peak RSS MiB"],
        [[n, common.dtypes(specs[n]), f"{workers[n].median:.2f}",
          common.spread(workers[n].times), f"{workers[n].cpu_median:.2f}",
          f"{tokens_per_s[n]:.1f}", first(workers[n]),
          common.mib(workers[n].info.get("step_delta_rss")),
          common.mib(workers[n].info.get("peak_rss"))] for n in names]))
    print("ratios of medians:")
    for num, den, what in (("jax-greedy", "jax-greedy-nocross", "cross-attention cache speed-up"),
                           ("jax-greedy", "peft-generate", "jax-greedy / peft-generate"),
                           ("jax-greedy-nocross", "peft-generate",
                            "jax-greedy-nocross / peft-generate"),
                           ("jax-steps", "jax-steps-nocross",
                            "cross-attention cache speed-up, step by step")):
        if {num, den} <= set(names):
            print(f"  {what} tokens/s{' ' * (46 - len(what))}"
                  f"{tokens_per_s[num] / tokens_per_s[den]:5.2f}  (inverse "
                  f"{common.per_round(workers[den], workers[num])})")


def main() -> None:
    p = common.parser(__doc__.split("\n")[0], "call")
    p.add_argument("--ensemble-batch", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--decode", action="store_true",
                   help="add the greedy-decoding variants (jax-greedy, jax-greedy-nocross, "
                        "peft-generate)")
    p.add_argument("--decode-length", type=int, default=16)
    args = p.parse_args()

    info = common.machine_info()
    common.print_machine(info)
    print(f"T5 1.1 {args.size} shapes, random weights; rank classification of {args.batch} "
          f"examples, inputs {args.input_length} + prompt {args.prompt_length}, "
          f"{len(LABELS)} candidates; ensembles: {args.ensemble_batch} examples x "
          f"{args.num_prompts} prompts; {args.warmup} warm-up call(s), {args.repeats} timed "
          "round(s)", flush=True)
    specs = variants(args)
    workers, peak = common.measure(__file__, specs, args.repeats, args.matmul_size)
    report(args, specs, workers, peak)


if __name__ == "__main__":
    common.entry(main, {"jax": setup_jax, "peft": setup_peft})
