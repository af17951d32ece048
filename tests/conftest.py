"""Shared fixtures: the repository's paths, the shared data directory, the one tiny model
config, the official-format data directory, and one finished demo run for the job tests.

JAX's persistent compilation cache is on for the tests and every job they start as a
subprocess (the environment is inherited), so a program compiled once — the demo's train
step, its eval and decode functions — is not compiled again by the next process.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
VOCAB_PATH = SHARED_DATA / "t5" / "spiece.model"
T5X_TINY = SHARED_DATA / "t5" / "t5x_tiny_checkpoint" / "checkpoint_3"
FIXTURES = pathlib.Path(__file__).resolve().parent / "testdata" / "official"
# Official files the task tests read from ../shared/data where present (else fixtures).
SHARED_TASKS = ("RTE", "WSC")

# Tests run on one CPU device unless they ask for more (see test_partitioning).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def tiny_config(**overrides):
    """The random T5 of the unit tests: 2+2 layers, d_model 32, vocabulary 128, no dropout."""
    from prompt_jax.t5.config import get_config

    settings = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                    num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)
    return get_config("tiny", **{**settings, **overrides})


def save_random_backbone(directory, rng: np.random.Generator, **overrides):
    """A random tiny T5 with T5's vocabulary (weights ~0.3 N(0, 1), norm scales ~1), saved as
    an HF directory: outputs that differ from input to input and prompt to prompt, so a
    mix-up shows. -> its config."""
    import flax
    import jax
    import jax.numpy as jnp

    from prompt_jax.checkpoints import save_hf
    from prompt_jax.t5.model import T5

    config = tiny_config(vocab_size=32128, **overrides)
    tokens = jnp.ones((1, 4), jnp.int32)
    shapes = flax.linen.unbox(jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), tokens,
                                             tokens)["params"])
    leaves, tree = jax.tree.flatten_with_path(shapes)
    params = [(1.0 + 0.1 * rng.normal(size=s.shape) if "scale" in jax.tree_util.keystr(path)
               else 0.3 * rng.normal(size=s.shape)).astype(np.float32) for path, s in leaves]
    save_hf(config, jax.tree.unflatten(tree, params), str(directory))
    return config


def build_data_dir(root: pathlib.Path) -> pathlib.Path:
    """A data directory: the shared RTE/WSC files beside the hand-written ones."""
    for bench in ("super_glue", "glue"):
        (root / bench).mkdir()
        for d in (FIXTURES / bench).iterdir():
            (root / bench / d.name).symlink_to(d)
    for name in SHARED_TASKS:
        if (SHARED_DATA / "super_glue" / name).is_dir():
            (root / "super_glue" / name).symlink_to(SHARED_DATA / "super_glue" / name)
    return root


def cli(*args: str, check: bool = True, timeout: int = 300, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """`prompt-jax ARGS` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "prompt_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"prompt-jax {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


# ------------------------------------------------------------- HF reference models

VOCAB = 120  # the vocabulary of the HF parity models

CONFIGS = {
    "t5_1_0_tied_relu": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1_untied_gated_gelu": dict(d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                     num_decoder_layers=2, num_heads=4,
                                     feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "heads_times_kv_ne_d_model": dict(d_model=24, d_kv=10, d_ff=40, num_layers=2,
                                      num_decoder_layers=2, num_heads=3,
                                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    # Deeper, asymmetric stacks, few buckets and a short max distance so that the
    # logarithmic buckets are exercised by the padded batch's lengths.
    "deep_padded_log_buckets": dict(d_model=32, d_kv=8, d_ff=64, num_layers=4,
                                    num_decoder_layers=3, num_heads=4,
                                    relative_attention_num_buckets=8,
                                    relative_attention_max_distance=20,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _randomize(model, seed: int) -> None:
    """Give every weight (norm scales and biases included) distinct random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if "layer_norm" not in name else 0.5
            base = 1.0 if "layer_norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=gen))


def build_hf_model(name: str, tmp_path, seed: int = 0):
    """A random HF T5ForConditionalGeneration of CONFIGS[name], saved to `tmp_path`."""
    import torch
    import transformers

    cfg = transformers.T5Config(vocab_size=VOCAB, dropout_rate=0.0, **CONFIGS[name])
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    if not CONFIGS[name]["tie_word_embeddings"]:
        # transformers >= 5 ties lm_head to the embedding on construction; T5 1.1 does not.
        model.lm_head.weight = torch.nn.Parameter(torch.empty(VOCAB, cfg.d_model))
    _randomize(model, seed)
    model.save_pretrained(tmp_path)
    return model


def padded_batch(rng: np.random.Generator, lengths, width: int) -> np.ndarray:
    """Rows of random ids (>= 2) ending in EOS (1), right-padded with 0."""
    out = np.zeros((len(lengths), width), np.int32)
    for row, n in enumerate(lengths):
        out[row, : n - 1] = rng.integers(2, VOCAB, n - 1)
        out[row, n - 1] = 1
    return out


def shift_right(targets: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)



# ------------------------------------------------------------- the CLI, as a user runs it

def post_all(url: str, bodies: list[tuple[str, dict]]) -> list:
    """POST every (path, body) to a server at `url` at once, each from its own connection
    (httpx responses, in the order given)."""
    import asyncio

    import httpx

    async def go():
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post(p, json=b) for p, b in bodies))
    return asyncio.run(go())


def run(capsys, *args: str) -> tuple[int, str, str]:
    """`prompt_jax.cli.main(args)` in process -> (exit code, stdout, stderr)."""
    from prompt_jax import cli as cli_module

    rc = cli_module.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_job(*args: str) -> None:
    """`prompt_jax.cli.main(args)` in process, for module fixtures (which have no capsys):
    a nonzero exit fails; the job's output is in the test's captured output."""
    from prompt_jax import cli as cli_module

    rc = cli_module.main(list(args))
    if rc != 0:
        raise AssertionError(f"prompt-jax {' '.join(args)} failed ({rc}); see its stderr")


def assert_one_line_error(rc: int, err: str, *patterns: str) -> None:
    assert rc != 0, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])


def snapshot(directory: pathlib.Path) -> dict[str, str]:
    """Hash of every file under `directory`: what must survive a failed command."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# The README's demo command, as it is, with fewer steps and a smaller eval set.
DEMO = ["--gin.train.eval_examples=24", "--gin.evaluate.eval_examples=24"]
DEMO_STEPS, DEMO_PERIOD = 8, 4


def train_args(model_dir, steps=8, period=4, settings=()):
    return ["train", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.EVAL_PERIOD={period}", "--gin.train.log_period=1", *settings]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's demo command (bundled backbone and data), with a small step count, run
    once for every job test that reads a finished run."""
    model_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = cli(*train_args(model_dir, DEMO_STEPS, DEMO_PERIOD, DEMO))
    return model_dir, proc


def shared_file(*parts: str) -> pathlib.Path:
    """A file under ../shared/data, or skip the test naming what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (see ../shared/data/SOURCES.md)")
    return path


@pytest.fixture
def vocab_path() -> pathlib.Path:
    return shared_file("t5", "spiece.model")


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Tests that run a job in-process leave its gin bindings behind (e.g. the demo's
    `data_paths.data_dir`, which outranks the environment); no other test may see them."""
    yield
    import gin

    gin.clear_config()


def t5x_with_prompt(dst: pathlib.Path, leaves: dict, zarr: tuple[str, ...] = ()) -> pathlib.Path:
    """A copy of the t5x-written tiny checkpoint at `dst` (a `checkpoint_<N>` directory) with
    `leaves` ({'encoder/prompt/prompt/prompt': array, ...}) added to its target: inlined in
    the msgpack, or, for the names in `zarr`, as zarr arrays beside it, as t5x writes them."""
    import shutil

    import numpy as np
    import tensorstore as ts
    from flax import serialization

    shutil.copytree(shared_file("t5", "t5x_tiny_checkpoint", "checkpoint_3"), dst)
    dst.chmod(0o755)
    (dst / "checkpoint").chmod(0o644)
    state = serialization.msgpack_restore((dst / "checkpoint").read_bytes())
    for name, value in leaves.items():
        node = state["optimizer"]["target"]
        *scopes, leaf = name.split("/")
        for scope in scopes:
            node = node.setdefault(scope, {})
        value = np.asarray(value)
        if name in zarr:
            rel = "target." + name.replace("/", ".")
            metadata = {"chunks": list(value.shape), "compressor": {"id": "gzip", "level": 1},
                        "dtype": value.dtype.str, "shape": list(value.shape)}
            ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(dst / rel)},
                     "metadata": metadata}, create=True).result().write(value).result()
            value = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": rel},
                     "metadata": metadata}
        node[leaf] = value
    (dst / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
    return dst
