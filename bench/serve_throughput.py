"""Mixed-task serving throughput: `prompt-jax serve` (HTTP, dynamic mixed-task batches) vs
the same requests served the way a PEFT user can (HF T5 + PEFT, one adapter at a time).

    python bench/serve_throughput.py                      # T5 1.1 small shapes, fp32
    python bench/serve_throughput.py --size tiny --requests 32 --num-prompts 4 \
        --input-length 32 --prompt-length 4 --decode-length 4 --repeats 1   # a smoke run

The load: `--requests` R single-input requests, request i for prompt i mod N
(`--num-prompts` N, order shuffled), inputs the bundled RTE slice as `rte hypothesis: …
premise: …` cut to `--input-length` tokens, greedy decoding of `--decode-length` tokens.
One set of random weights (an HF directory, `save_hf`) and N random prompts (`.npy` for
prompt_jax, PEFT PROMPT_TUNING adapters via `save_peft`) serve both sides. Variants:
  jax-serve    `prompt_jax.serve` on a loopback port in the worker (MAX_BATCH_SIZE =
               `--batch`, MAX_WAIT_MS = `--max-wait-ms`, input buckets L/2 and L); one call
               sends all R requests at once from an asyncio httpx client in the same
               process (`--clients` connections) and waits for every answer. Each padded
               shape is compiled before timing.
  peft-grouped HF `T5ForConditionalGeneration` + PEFT with the N adapters loaded
               (`PeftModel.load_adapter`); per adapter in turn: `set_adapter`, its requests
               in batches of `--batch` (padded to the longest), `generate(max_new_tokens=
               L, num_beams=1, do_sample=False)` under `torch.inference_mode()`. No HTTP,
               and every request known in advance, grouped by adapter: the best a PEFT
               user's own loop can do, since PEFT cannot batch mixed prompt adapters.
  peft-fifo    the same, with the requests taken in arrival order (a queue): consecutive
               requests for one adapter share a batch, a change of adapter ends it.
  with --bf16: jax-serve-bf16w (frozen weights bf16); with --ynn: jax-serve-ynn (XLA's CPU
               defaults, YNNPACK fusions on).
Both sides tokenize and detokenize. Requests/s = R / median call time; `agree` is the
share of requests whose prediction equals peft-grouped's (float rounding may flip a few).
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import tempfile
from typing import Any

import common

RTE = pathlib.Path(__file__).resolve().parents[1] / "prompt_jax" / "demo_data" / "super_glue" \
    / "RTE" / "train.jsonl"


def _vocab():
    from prompt_jax import tasks

    return tasks.get_vocabulary()


def write_load(args, root: pathlib.Path) -> dict[str, str]:
    """The backbone, the prompts and the requests, written once for every worker."""
    import numpy as np

    from prompt_jax import build, prompts
    from prompt_jax.checkpoints import save_hf
    from prompt_jax.checkpoints.peft import save_peft

    config, params = build.load_frozen(build.ModelSpec(size=common.SIZES[args.size]), None,
                                       None, seed=0)
    save_hf(config, params, str(root / "model"))
    rng = np.random.default_rng(0)
    for n in range(args.num_prompts):
        prompt = rng.uniform(-0.5, 0.5, (args.prompt_length, config.d_model)).astype(np.float32)
        prompts.save_prompt(str(root / "npy" / f"p{n}.npy"), prompt)
        save_peft(prompt, str(root / "peft" / f"p{n}"), str(root / "model"))
    vocab = _vocab()
    texts = []
    with open(RTE) as f:
        for line in f:
            ex = json.loads(line)
            ids = list(vocab.encode(f"rte hypothesis: {ex['hypothesis']} premise: "
                                    f"{ex['premise']}"))[: args.input_length - 1]
            texts.append(vocab.decode(ids))
    texts = (texts * (args.requests // len(texts) + 1))[: args.requests]
    names = [f"p{i % args.num_prompts}" for i in range(args.requests)]
    random.Random(0).shuffle(names)
    (root / "requests.json").write_text(json.dumps(list(zip(names, texts, strict=True))))
    return {"model": str(root / "model"), "npy": str(root / "npy"), "peft": str(root / "peft"),
            "requests": str(root / "requests.json")}


def setup_jax(spec: dict[str, Any]):
    import asyncio

    import httpx
    import numpy as np

    from prompt_jax import build, serve

    requests = json.loads(pathlib.Path(spec["requests"]).read_text())
    length, L = spec["input_length"], spec["decode_length"]
    batching = serve.BatchingSpec(max_batch_size=spec["batch"], max_wait_ms=spec["max_wait_ms"],
                                  length_buckets=(length // 2, length))
    service = serve.load_service(
        initial_checkpoint=spec["model"], prompt_dir=spec["npy"],
        model=build.ModelSpec(param_dtype=spec["param_dtype"]), batching=batching,
        limits=serve.Limits(max_input_length=length, max_decode_length=L, decode_length=L))
    engine = service.engine
    prompt = np.zeros((spec["prompt_length"], engine.config.d_model), np.float32)
    for batch in engine.batch_sizes:  # compile every shape the load can reach
        for tokens in engine.length_sizes:
            engine.run([serve.Row(("generate",), [5] * (tokens - 1) + [1], prompt, 0, L)] * batch)
    running = serve.run_in_thread(serve.create_app(service))
    info: dict[str, Any] = {"compiled": len(engine.batch_sizes) * len(engine.length_sizes)}

    async def send_all():
        limits = httpx.Limits(max_connections=spec["clients"])
        async with httpx.AsyncClient(base_url=running.url, timeout=3600, limits=limits) as c:
            return await asyncio.gather(*(c.post("/v1/generate", json={
                "prompt": name, "inputs": [text], "max_decode_length": L, "truncate": True})
                for name, text in requests))

    def run_once():
        before, batches_before = service.metrics.tokens, sum(service.metrics.batches.values())
        answers = asyncio.run(send_all())
        bad = [a.text for a in answers if a.status_code != 200]
        if bad:
            raise RuntimeError(f"{len(bad)} requests failed, e.g. {bad[0]}")
        info["predictions"] = [a.json()["outputs"][0]["prediction"] for a in answers]
        info["tokens"] = service.metrics.tokens - before
        info["batches_run"] = sum(service.metrics.batches.values()) - batches_before

    return run_once, info


def setup_peft(spec: dict[str, Any]):
    import torch
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    from prompt_jax.evaluation import trim_at_eos

    torch.set_num_threads(spec["threads"])
    requests = json.loads(pathlib.Path(spec["requests"]).read_text())
    names = sorted({name for name, _ in requests})
    base = T5ForConditionalGeneration.from_pretrained(spec["model"])
    model = PeftModel.from_pretrained(base, os.path.join(spec["peft"], names[0]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(os.path.join(spec["peft"], name), adapter_name=name)
    model.eval()
    vocab = _vocab()
    batches = []  # (adapter, request indices)
    if spec["order"] == "grouped":
        for name in names:
            rows = [i for i, (n, _) in enumerate(requests) if n == name]
            batches += [(name, rows[k:k + spec["batch"]])
                        for k in range(0, len(rows), spec["batch"])]
    else:
        for i, (name, _) in enumerate(requests):
            if batches and batches[-1][0] == name and len(batches[-1][1]) < spec["batch"]:
                batches[-1][1].append(i)
            else:
                batches.append((name, [i]))
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "batches": len(batches)}

    def run_once():
        predictions, tokens = [None] * len(requests), 0
        for name, chunk in batches:
            model.set_adapter(name)
            ids = [list(vocab.encode(requests[i][1]))[: spec["input_length"] - 1] + [1]
                   for i in chunk]
            x = torch.zeros((len(ids), max(map(len, ids))), dtype=torch.long)
            for j, row in enumerate(ids):
                x[j, :len(row)] = torch.tensor(row)
            with torch.inference_mode():
                out = model.generate(input_ids=x, attention_mask=(x > 0).long(),
                                     max_new_tokens=spec["decode_length"], num_beams=1,
                                     do_sample=False)[:, 1:]  # less the start token
            for i, row in zip(chunk, out.numpy(), strict=True):
                predictions[i] = vocab.decode(trim_at_eos(row))
                tokens += int((row > 0).sum())
        info["predictions"], info["tokens"] = predictions, tokens

    return run_once, info


def variants(args, paths: dict[str, str]) -> dict[str, dict[str, Any]]:
    base = dict(paths, size=args.size, batch=args.batch, input_length=args.input_length,
                prompt_length=args.prompt_length, decode_length=args.decode_length,
                warmup=args.warmup, threads=common.cores(), max_wait_ms=args.max_wait_ms,
                clients=args.clients, dtype="float32", param_dtype="float32")
    out = {"jax-serve": dict(base, kind="jax"),
           "peft-grouped": dict(base, kind="peft", order="grouped"),
           "peft-fifo": dict(base, kind="peft", order="fifo")}
    if args.bf16:
        out["jax-serve-bf16w"] = dict(base, kind="jax", param_dtype="bfloat16")
    if args.ynn:
        out["jax-serve-ynn"] = dict(base, kind="jax", ynn=True)
    return common.select_variants(out, args.variants)


def report(args, specs, workers) -> None:
    per_s, rows = {}, []
    reference = (workers["peft-grouped"].info["predictions"] if "peft-grouped" in workers
                 else None)
    for name, w in workers.items():
        per_s[name] = args.requests / w.median
        predictions = w.info["predictions"]
        same = sum(a == b for a, b in zip(predictions, reference or predictions, strict=True))
        agree = "n/a" if reference is None else f"{same / len(reference):.0%}"
        rows.append([name, common.dtypes(specs[name]), args.requests,
                     w.info.get("batches", w.info.get("batches_run", "n/a")), f"{w.median:.2f}",
                     common.spread(w.times), f"{w.cpu_median:.1f}", f"{per_s[name]:.1f}",
                     f"{w.info['tokens'] / w.median:.0f}", agree,
                     f"{w.info['warmup_seconds'][0]:.1f}" if w.info["warmup_seconds"] else "n/a",
                     common.mib(w.info["peak_rss"])])
    print()
    print(common.table(["variant", "weights/acts", "requests", "batches", "call s (median)",
                        "min–max",
                        "CPU s", "requests/s", "tokens/s", "agree", "first call s",
                        "peak RSS MiB"], rows))
    print("\nratios of medians:")
    for other in ("peft-fifo", "peft-grouped"):
        if {"jax-serve", other} <= set(per_s):
            r = per_s["jax-serve"] / per_s[other]
            print(f"  jax-serve / {other} requests/s{' ' * (14 - len(other))}{r:5.2f}  (inverse "
                  f"call-time {common.per_round(workers[other], workers['jax-serve'])}); goal "
                  f">= 3: {common.verdict(r >= 3)}")
    for name in ("jax-serve-bf16w", "jax-serve-ynn"):
        if {name, "jax-serve"} <= set(per_s):
            print(f"  {name} / jax-serve requests/s{' ' * (18 - len(name))}"
                  f"{per_s[name] / per_s['jax-serve']:5.2f}  (inverse "
                  f"{common.per_round(workers['jax-serve'], workers[name])})")
    print("load average at end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def main() -> None:
    p = common.parser(__doc__.split("\n")[0], "call")
    p.set_defaults(batch=32, prompt_length=20)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--decode-length", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP connections")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the warm-up call's predictions are compared)")

    info = common.machine_info()
    common.print_machine(info)
    print(f"T5 1.1 {args.size} shapes, random weights; {args.requests} requests over "
          f"{args.num_prompts} prompts of {args.prompt_length} tokens, inputs <= "
          f"{args.input_length} tokens (RTE), greedy {args.decode_length} tokens; batch "
          f"{args.batch}; {args.warmup} warm-up call(s), {args.repeats} timed round(s)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        paths = write_load(args, pathlib.Path(tmp))
        specs = variants(args, paths)
        workers = common.start_workers(__file__, specs)
        common.run_rounds(workers, args.repeats)
    report(args, specs, workers)


if __name__ == "__main__":
    common.entry(main, {"jax": setup_jax, "peft": setup_peft})
