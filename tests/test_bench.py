"""Smoke tests of bench/: each script runs end to end at the tiniest settings and prints
its table and ratios. Timings are never asserted (benchmarks are scripts, not tests)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

TINY = ["--size", "tiny", "--input-length", "8", "--prompt-length", "4", "--warmup", "1",
        "--repeats", "1", "--matmul-size", "128"]


def run_script(name: str, *args: str) -> str:
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / name), *args],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def bench_common():
    """bench/common.py under its own module name (another module named `common` may be
    imported already)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", REPO_ROOT / "bench" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(out: str) -> list[str]:
    """The first cell of each row of the printed table."""
    return [m.group(1) for m in re.finditer(r"^\|\s*([\w-]+) \|", out, re.M)
            if m.group(1) != "variant"]


@pytest.mark.slow
def test_train_throughput_prints_every_variant_and_ratio():
    out = run_script("train_throughput.py", *TINY, "--batch", "2", "--target-length", "4",
                     "--bf16", "--ynn")
    assert table_rows(out) == ["jax-prompt", "jax-model", "peft-prompt", "jax-prompt-bf16w",
                               "jax-prompt-bf16", "jax-prompt-ynn", "jax-model-ynn"]
    for ratio in ("prompt_jax / PEFT examples/s", "prompt step / model step",
                  "FLOP/s / fp32 matmul peak"):
        assert re.search(re.escape(ratio) + r".*\d\.\d\d.*(PASS|FAIL)", out), ratio
    assert "matmul peak (128x128 jnp.dot" in out


@pytest.mark.slow
def test_infer_throughput_prints_every_variant_and_ratio():
    out = run_script("infer_throughput.py", *TINY, "--batch", "2", "--ensemble-batch", "2",
                     "--num-prompts", "5")
    assert table_rows(out) == ["jax-rank", "peft-rank", "peft-rank-percand", "jax-ens-1pass",
                               "jax-ens-5pass"]
    assert re.search(r"jax-rank / peft-rank examples/s\s+\d+\.\d\d", out)
    assert re.search(r"ensemble of 5: 1 pass speed-up over 5 passes\s+\d+\.\d\d", out)


@pytest.mark.slow
def test_train_throughput_methods_prints_every_method_and_ratio():
    out = run_script("train_throughput.py", *TINY, "--batch", "2", "--target-length", "4",
                     "--methods", "--variants", "jax-prompt,peft-prompt,jax-p-tuning,"
                     "peft-p-tuning,jax-p-tuning-v2,jax-prefix-tuning,peft-prefix-tuning")
    assert table_rows(out) == ["jax-prompt", "peft-prompt", "jax-p-tuning", "peft-p-tuning",
                               "jax-p-tuning-v2", "jax-prefix-tuning", "peft-prefix-tuning"]
    for ratio in ("jax-p-tuning / peft-p-tuning", "jax-prefix-tuning / peft-prefix-tuning",
                  "jax-p-tuning-v2 / jax-prompt", "peft-prefix-tuning / peft-prompt"):
        assert re.search(re.escape(ratio) + r" examples/s\s+\d+\.\d\d", out), ratio
    # The same trainable tensors on both sides (PEFT's P-tuning embeds 2P inputs, ours P).
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\|\s*([\w-]+) \|[^|]*\|\s*([\d,]+)"
                                                        r" \|", out, re.M)}
    assert rows["jax-prefix-tuning"] == rows["peft-prefix-tuning"]
    jax_pt, peft_pt = (int(rows[n].replace(",", "")) for n in ("jax-p-tuning", "peft-p-tuning"))
    assert peft_pt - jax_pt == 4 * 64  # P x d_model of the tiny config


def test_jaxpr_matmul_flops_counts_a_scan_body_per_iteration():
    import jax
    import jax.numpy as jnp

    common = bench_common()

    def f(x, w, head):
        x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)
        return x @ head

    jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 4)), jnp.ones((4, 4)), jnp.ones((4, 2)))
    assert common.jaxpr_matmul_flops(jaxpr.jaxpr) == 5 * 2 * 3 * 4 * 4 + 2 * 3 * 4 * 2


@pytest.mark.parametrize("mode", [None, "model", "prompt"])
def test_analytic_flops_count_the_dots_of_the_step(mode):
    """`common.t5_matmul_flops` equals the dot FLOPs of the traced forward / train step."""
    import flax
    import jax
    import jax.numpy as jnp

    common = bench_common()

    from prompt_jax import optim, train_step
    from prompt_jax.t5 import T5, get_config

    cfg = get_config("tiny", vocab_size=256, dropout_rate=0.0)
    prompt = 5 if mode == "prompt" else 0
    model = T5(cfg, prompt_length=prompt)
    batch = {"encoder_input_tokens": jnp.full((4, 24 - prompt), 7, jnp.int32),
             "decoder_input_tokens": jnp.full((4, 6), 7, jnp.int32),
             "decoder_target_tokens": jnp.full((4, 6), 7, jnp.int32)}
    params = flax.linen.unbox(model.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                                         batch["decoder_input_tokens"])["params"])
    if mode is None:
        jaxpr = jax.make_jaxpr(model.apply)({"params": params}, batch["encoder_input_tokens"],
                                            batch["decoder_input_tokens"])
    else:
        regexes = optim.DEFAULT_TRAINABLE if mode == "prompt" else optim.MODEL_TUNING
        trainable, frozen = optim.split_params(params, regexes)
        tx = optim.adafactor()
        step = train_step.make_train_step(model, tx, train_step.LossConfig())
        jaxpr = jax.make_jaxpr(step)(train_step.TrainState.create(trainable, tx), frozen, batch)
    assert common.t5_matmul_flops(cfg, 4, 24, 6, mode) == common.jaxpr_matmul_flops(jaxpr.jaxpr)
