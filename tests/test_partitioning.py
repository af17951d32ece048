"""Shardings from the rules table, and sharded training equal to one-device training.

pytest runs every test file in one single-device process, so the multi-device checks run
this file as a script in subprocesses: `python tests/test_partitioning.py eight OUT` (with
`--xla_force_host_platform_device_count=8`) and `... process PID PORT OUT` (two processes
x 2 CPU devices, `jax.distributed` over gloo on localhost). The workers write JSON/npz
into OUT and the tests check them; the one-device reference is a plain `jax.jit` (no mesh,
no shardings) computed by the first worker, which also saves the initial parameters that
the two processes load.

Tolerances: float32 sums are reordered across shards, so losses agree to 1e-5 relative
and the updated prompt (entries of size ~0.5, updates of size lr=0.3) to 5e-5 absolute.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_jax import optim, partitioning, train_step
from prompt_jax.t5 import T5, get_config
from prompt_jax.t5 import model as t5_model

HERE = pathlib.Path(__file__).resolve()
REPO = HERE.parents[1]
CONFIG = get_config("tiny", vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                    num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0)
PROMPT_LENGTH = 8
BATCH, STEPS = 16, 2
MESHES = [(8, 1), (4, 2), (2, 4)]
LOSS_RTOL, PROMPT_ATOL = 1e-5, 5e-5
# Halves XLA:CPU compile time in the workers (the reference is compiled the same way).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


# ------------------------------------------------------------ shared by all processes


def make_model() -> T5:
    return T5(CONFIG, prompt_length=PROMPT_LENGTH)


def make_batches() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        enc = rng.integers(2, 128, (BATCH, 12)).astype(np.int32)
        enc[:, -3:] = 0
        tgt = rng.integers(2, 128, (BATCH, 4)).astype(np.int32)
        dec = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
        out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                    "decoder_target_tokens": tgt})
    return out


def init_args():
    b = make_batches()[0]
    return jax.random.PRNGKey(0), b["encoder_input_tokens"], b["decoder_input_tokens"]


def load_params(out: pathlib.Path) -> dict:
    with np.load(out / "params.npz") as f:
        return optim.unflatten({k: f[k] for k in f.files})


def train_on_mesh(mesh, params, local_batches):
    """STEPS prompt-tuning steps with every array placed per the rules, as the train job
    places them (`train_step.initial_state`, `jit_train_step`).

    -> (losses, updated prompt, the jitted step, abstract arguments of its last call)."""
    model, tx = make_model(), optim.adafactor()
    state, frozen, shardings = train_step.initial_state(mesh, model, params,
                                                        optim.DEFAULT_TRAINABLE, tx)
    step = train_step.jit_train_step(train_step.make_train_step(model, tx), mesh, shardings)
    losses, args = [], None
    for b in local_batches:
        batch = partitioning.global_batch(b, mesh)
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            (state, frozen, batch))
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return losses, np.asarray(state.trainable["encoder"]["prompt"]["prompt"]), step, args


def decode_on(mesh, params, tokens):
    """Greedy and beam decoding and candidate scores with the batch's rows on `data`."""
    from prompt_jax import build, decoding, serving

    model = T5(CONFIG)
    flat = optim.flatten(params)
    prompt = flat.pop("encoder/prompt/prompt")
    frozen = optim.unflatten(flat)
    placed = frozen if mesh is None else build.place_params(CONFIG, frozen, mesh)
    batch = jnp.asarray(tokens) if mesh is None else partitioning.whole_batch(
        {"x": tokens}, mesh)["x"]
    greedy, greedy_scores = decoding.greedy_decode(model, placed, batch, 6, jnp.asarray(prompt))
    beams, beam_scores = decoding.beam_search(model, placed, batch, 5, 3, 0.6,
                                              jnp.asarray(prompt))
    candidates = np.array([[5, 9, 1, 0], [7, 1, 0, 0], [3, 3, 3, 1]], np.int32)
    ranked = serving.score_targets(model, placed, batch, candidates, jnp.asarray(prompt))
    return {"greedy": np.asarray(greedy), "greedy_scores": np.asarray(greedy_scores),
            "beams": np.asarray(beams), "beam_scores": np.asarray(beam_scores),
            "ranked": np.asarray(ranked)}


def spec_list(sharding) -> list:
    return [a if a is None or isinstance(a, str) else list(a) for a in sharding.spec]


# ------------------------------------------------------------------------- workers


def reference(out: pathlib.Path) -> tuple[dict, list[float], np.ndarray]:
    """Host params (saved for the other workers) and one-device training: plain jax.jit."""
    model, tx = make_model(), optim.adafactor()
    params = jax.tree.map(np.asarray, nn.unbox(jax.jit(model.init)(*init_args())["params"]))
    np.savez(out / "params.npz", **optim.flatten(params))
    trainable, frozen = optim.split_params(params)
    state = train_step.TrainState.create(trainable, tx)
    step = jax.jit(train_step.make_train_step(model, tx))
    losses = []
    for b in make_batches():
        state, metrics = step(state, frozen, b)
        losses.append(float(metrics["loss"]))
    return params, losses, np.asarray(state.trainable["encoder"]["prompt"]["prompt"])


def worker_eight(out: pathlib.Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    params, losses, prompt = reference(out)
    model = make_model()
    result = {"reference_losses": losses}
    prompts = {"reference": prompt}

    # Parameter and optimizer-state shardings on a 2x4 mesh.
    mesh = partitioning.make_mesh((2, 4))
    abstract = t5_model.abstract_params(CONFIG, PROMPT_LENGTH, boxed=True)
    shardings = partitioning.params_shardings(mesh, abstract)
    result["params"] = {k: spec_list(s) for k, s in optim.flatten(shardings).items()}
    tx = optim.adafactor(min_dim_size_to_factor=16)  # factor the tiny model's matrices
    unboxed = nn.unbox(abstract)
    o_sh = partitioning.opt_state_shardings(tx, unboxed, shardings)
    result["opt_state"] = {
        jax.tree_util.keystr(p): [list(x.shape), spec_list(s)] for (p, x), s in zip(
            jax.tree_util.tree_flatten_with_path(jax.eval_shape(tx.init, unboxed))[0],
            jax.tree.leaves(o_sh), strict=True)}

    # The train state created directly sharded: each device holds its slice, values as the
    # host's, shardings as the rules give them.
    state, frozen, state_sh = train_step.initial_state(mesh, model, params,
                                                       optim.DEFAULT_TRAINABLE, tx)
    emb = frozen["token_embedder"]["embedding"]
    result["embedding_shard_shapes"] = sorted({tuple(s.data.shape) for s in
                                               emb.addressable_shards})
    placed = {**optim.flatten(frozen), **optim.flatten(state.trainable)}
    result["init_max_diff"] = max(float(np.max(np.abs(np.asarray(v) - optim.flatten(params)[k])))
                                  for k, v in placed.items())
    result["init_shardings_match"] = all(
        v.sharding == optim.flatten(shardings)[k] for k, v in placed.items())

    # Eval and decoding with the batch's rows on `data` equal one device.
    tokens = make_batches()[0]["encoder_input_tokens"]
    one = decode_on(None, params, tokens)
    result["decoding"] = {}
    for shape in [(8, 1), (4, 2)]:
        got = decode_on(partitioning.make_mesh(shape), params, tokens)
        result["decoding"][str(shape)] = {
            "same_tokens": bool(np.array_equal(got["greedy"], one["greedy"])
                                and np.array_equal(got["beams"], one["beams"])),
            "max_score_diff": max(float(np.max(np.abs(got[k] - one[k])))
                                  for k in ("greedy_scores", "beam_scores", "ranked"))}

    # Errors.
    errors = {}
    for name, fn in {
        "mesh_too_big": lambda: partitioning.make_mesh((4, 4)),
        "mesh_indivisible": lambda: partitioning.make_mesh((-1, 3)),
        "batch_8x1": lambda: partitioning.global_batch(
            {"x": np.zeros((6, 3), np.int32)}, partitioning.make_mesh((8, 1))),
    }.items():
        try:
            fn()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    result["errors"] = errors

    # Sharded training on each mesh.
    batches = make_batches()
    result["losses"] = {}
    for shape in MESHES:
        mesh = partitioning.make_mesh(shape)
        losses, prompt, step, args = train_on_mesh(mesh, params, batches)
        result["losses"][str(shape)] = losses
        prompts[str(shape)] = prompt
        if shape == (2, 4):
            hlo = step.lower(*args).as_text()
            result["constraints"] = [ln.strip() for ln in hlo.splitlines()
                                     if "sharding_constraint" in ln]
            # The legacy `with mesh:` context does not activate flax's constraints.
            with mesh, nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
                legacy = jax.jit(train_step.make_train_step(model, optim.adafactor()))
                result["legacy_constraints"] = legacy.lower(*args).as_text().count(
                    "sharding_constraint")
    np.savez(out / "prompts_eight.npz", **prompts)
    (out / "eight.json").write_text(json.dumps(result))


def worker_process(pid: int, port: int, out: pathlib.Path) -> None:
    assert partitioning.initialize_distributed(2, pid, f"localhost:{port}")
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    params = load_params(out)
    result, prompts = {}, {}
    for shape in [(-1, 1), (2, 2)]:
        mesh = partitioning.make_mesh(shape)
        index, count = partitioning.data_shard(mesh)
        rows = slice(index * BATCH // count, (index + 1) * BATCH // count)
        local = [{k: v[rows] for k, v in b.items()} for b in make_batches()]
        losses, prompt, _, _ = train_on_mesh(mesh, params, local)
        result[str(shape)] = {"shard": [index, count], "losses": losses}
        prompts[str(shape)] = prompt
    np.savez(out / f"prompts_process{pid}.npz", **prompts)
    (out / f"process{pid}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- tests


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    out = tmp_path_factory.mktemp("partitioning")
    proc = subprocess.run([sys.executable, str(HERE), "eight", str(out)], env=_env(8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "eight.json").read_text())
    with np.load(out / "prompts_eight.npz") as f:
        result["prompts"] = {k: f[k] for k in f.files}
    result["out"] = out
    return result


def test_rules_table_covers_every_logical_axis_of_the_model():
    """Every logical name a parameter or activation of T5 carries has exactly one rule, every
    rule maps to an axis of the mesh (or replicates) and names something the model uses."""
    rules = dict(partitioning.LOGICAL_AXIS_RULES)
    assert len(rules) == len(partitioning.LOGICAL_AXIS_RULES), "one rule per logical name"
    assert set(rules.values()) <= set(partitioning.MESH_AXES) | {None}
    boxed = t5_model.abstract_params(CONFIG, PROMPT_LENGTH, boxed=True)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    param_names = {n for leaf in leaves for n in leaf.names}
    layers_source = (REPO / "prompt_jax" / "t5" / "layers.py").read_text() + \
        (REPO / "prompt_jax" / "t5" / "model.py").read_text()
    activation_names = {n for n in rules if f'"{n}"' in layers_source}
    assert param_names <= set(rules), param_names - set(rules)
    assert set(rules) == param_names | activation_names, set(rules) - param_names
    # The prompt is replicated (prompt tuning's rule): every device holds it whole.
    assert rules["prompt"] is None and rules["prompt_embed"] is None
    assert rules["batch"] == "data"


def test_param_shardings_follow_rules(eight):
    specs = eight["params"]
    expected = {
        "token_embedder/embedding": ["model", None],  # (vocab, embed)
        "encoder/layers_0/attention/query/kernel": [None, "model"],  # (embed, joined_kv)
        "encoder/layers_0/attention/out/kernel": ["model", None],  # (joined_kv, embed)
        "encoder/layers_0/mlp/wi_0/kernel": [None, "model"],  # (embed, mlp)
        "decoder/layers_0/mlp/wo/kernel": ["model", None],  # (mlp, embed)
        "decoder/logits_dense/kernel": [None, "model"],  # (embed, vocab)
        "encoder/layers_0/pre_attention_layer_norm/scale": [None],  # (embed,)
        "encoder/prompt/prompt": [None, None],  # (prompt, prompt_embed): replicated
        # (heads, relpos_buckets): the buckets replicated, heads on `model` as in t5x.
        "encoder/relpos_bias/rel_embedding": ["model", None],
    }
    for path, spec in expected.items():
        assert specs[path] == spec, path
    # Every parameter is covered; only vocab/joined_kv/mlp/heads dims are ever sharded.
    assert len(specs) == len(optim.flatten(t5_model.abstract_params(CONFIG, PROMPT_LENGTH)))


def test_opt_state_shardings_follow_params(eight):
    state = eight["opt_state"]

    def find(field, path):
        [(shape, spec)] = [v for k, v in state.items()
                           if (f".{field}[" in k or k.endswith(f".{field}")) and path in k]
        return [shape, spec]

    # wi_0 [E=32, F=64] (None, model): v_row drops the largest dim (F), v_col the other.
    assert find("v_row", "['encoder']['layers_0']['mlp']['wi_0']") == [[32], [None]]
    assert find("v_col", "['encoder']['layers_0']['mlp']['wi_0']") == [[64], ["model"]]
    # embedding [V=128, E=32] (model, None).
    assert find("v_row", "['token_embedder']['embedding']") == [[32], [None]]
    assert find("v_col", "['token_embedder']['embedding']") == [[128], ["model"]]
    # Unfactored (1-D, or small: the prompt [8, 32]): a full `v` with the param's spec.
    assert find("v", "['encoder']['prompt']['prompt']") == [[8, 32], [None, None]]
    assert find("v", "['encoder']['relpos_bias']['rel_embedding']") == [[4, 32], ["model", None]]
    # Counters and optax's (1,) placeholders are replicated.
    assert find("count", "") == [[], []]
    assert find("v", "['encoder']['layers_0']['mlp']['wi_0']") == [[1], []]


def test_created_directly_sharded(eight):
    assert eight["embedding_shard_shapes"] == [[32, 32]]  # [128, 32] over model=4
    assert eight["init_shardings_match"]
    assert eight["init_max_diff"] <= 1e-6


@pytest.mark.parametrize("shape", ["(8, 1)", "(4, 2)"])
def test_decoding_with_data_sharded_batches_matches_one_device(eight, shape):
    result = eight["decoding"][shape]
    assert result["same_tokens"]
    assert result["max_score_diff"] <= 1e-4


def test_errors_on_eight_devices(eight):
    errors = eight["errors"]
    assert errors["mesh_too_big"] == "mesh (4, 4) needs 16 devices, 8 available"
    assert "cannot be split evenly into model=3" in errors["mesh_indivisible"]
    assert errors["batch_8x1"].startswith("global batch size 6 of 'x' is not divisible by "
                                          "the data-parallel size 8")


def test_activation_constraints_reach_the_compiled_step(eight):
    constraints = eight["constraints"]
    # q/k/v [B, T, H, D] with batch on data and heads on model; MLP [B, T, F] likewise.
    assert any('[{"data"}, {}, {"model"}, {}]' in c for c in constraints), constraints
    assert any('[{"data"}, {}, {"model"}]' in c for c in constraints), constraints
    assert eight["legacy_constraints"] == 0


@pytest.mark.parametrize("shape", MESHES)
def test_meshes_match_one_device(eight, shape):
    losses, prompt = eight["reference_losses"], eight["prompts"]["reference"]
    np.testing.assert_allclose(eight["losses"][str(shape)], losses, rtol=LOSS_RTOL)
    np.testing.assert_allclose(eight["prompts"][str(shape)], prompt, atol=PROMPT_ATOL, rtol=0)
    assert not np.allclose(prompt, load_params(eight["out"])["encoder"]["prompt"]["prompt"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(eight):
    out, losses, prompt = eight["out"], eight["reference_losses"], eight["prompts"]["reference"]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(HERE), "process", str(pid), str(port),
                               str(out)], env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    for pid in range(2):
        result = json.loads((out / f"process{pid}.json").read_text())
        with np.load(out / f"prompts_process{pid}.npz") as f:
            for shape in ["(-1, 1)", "(2, 2)"]:
                assert result[shape]["shard"] == [pid, 2], (shape, result[shape])
                np.testing.assert_allclose(result[shape]["losses"], losses, rtol=LOSS_RTOL)
                np.testing.assert_allclose(f[shape], prompt, atol=PROMPT_ATOL, rtol=0)


def test_mesh_and_batch_errors_on_one_device():
    assert dict(partitioning.make_mesh().shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match=r"mesh \(4, 4\) needs 16 devices, 1 available"):
        partitioning.make_mesh((4, 4))
    with pytest.raises(ValueError, match="at most one -1"):
        partitioning.make_mesh((-1, -1))
    with pytest.raises(ValueError, match="two integers"):
        partitioning.make_mesh((1, 1, 1))
    mesh = partitioning.make_mesh((1, 1))
    batch = partitioning.global_batch({"x": np.arange(6).reshape(3, 2)}, mesh)
    assert batch["x"].shape == (3, 2) and partitioning.data_shard(mesh) == (0, 1)


def test_indivisible_dimension_is_replicated():
    spec = partitioning.logical_to_spec(("heads", "relpos_buckets"), (6, 32),
                                        {"data": 1, "model": 4})
    assert spec == jax.sharding.PartitionSpec(None, None)
    spec = partitioning.logical_to_spec(("heads", "relpos_buckets"), (8, 32),
                                        {"data": 1, "model": 4})
    assert spec == jax.sharding.PartitionSpec("model", None)


def test_initialize_distributed_single_process(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert partitioning.initialize_distributed() is False
    assert partitioning.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="needs COORDINATOR_ADDRESS"):
        partitioning.initialize_distributed(num_processes=2, process_id=0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        partitioning.initialize_distributed()


def test_sharded_jit_on_one_device():
    mesh = partitioning.make_mesh((1, 1))
    f = lambda x: nn.with_logical_constraint(x * 2, ("batch", "mlp"))
    x = jnp.ones((2, 4))
    step = partitioning.sharded_jit(f, mesh, in_shardings=None, out_shardings=None)
    assert "sharding_constraint" in step.lower(x).as_text()
    # Outside: the model's constraints are no-ops (a fresh function: no cache hit).
    assert "sharding_constraint" not in jax.jit(lambda y: f(y)).lower(x).as_text()


if __name__ == "__main__":
    if sys.argv[1] == "eight":
        worker_eight(pathlib.Path(sys.argv[2]))
    elif sys.argv[1] == "process":
        worker_process(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
    else:
        raise SystemExit(f"unknown worker {sys.argv[1]!r}")
