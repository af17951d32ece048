"""Logical axis names -> a `(data, model)` mesh: the one rules table and everything derived from it.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the key
activations carry logical constraints (`nn.with_logical_constraint`). `LOGICAL_AXIS_RULES`
maps the names to mesh axes; parameter, optimizer-state and batch shardings all come from it:

    mesh = make_mesh((-1, 1))                                    # all devices on `data`
    abstract = abstract_params(config, prompt_length, boxed=True)  # prompt_jax.t5.model
    shardings = params_shardings(mesh, abstract)                 # NamedSharding per leaf
    params = shard_params(host_params, shardings)
    step = sharded_jit(train_step, mesh, in_shardings=..., out_shardings=...)
    state, metrics = step(state, frozen, global_batch(local_batch, mesh))

Activation constraints on jax 0.10 / flax 0.12: flax applies them only when
`jax.sharding.get_abstract_mesh()` is non-empty AND logical rules are set. The legacy
`with mesh:` does not set the abstract mesh, so under it the constraints are silently
dropped. `sharded_jit` enters `use_abstract_mesh(mesh.abstract_mesh)` and
`nn.logical_axis_rules(rules)` *inside* the traced function, so every trace carries the
constraints whatever context the caller is in (rules are flax thread-local state, not part
of jit's cache key, so entering them around the call is not enough on a cache hit).

Multi-host: `initialize_distributed()` first; `data_shard(mesh)` says which shard of the
data this process reads (seqio's `ShardInfo(index, num_shards)`); `global_batch` assembles
the per-process batches into global arrays; `whole_batch` places a batch every process holds
whole (eval, infer) the same way.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "model")
Rules = Sequence[tuple[str, str | None]]

# t5x's `standard_logical_axis_rules()` (1-D parameter and activation partitioning), plus
# prompt-tuning's rule that the prompt is replicated everywhere.
LOGICAL_AXIS_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("relpos_buckets", None),
    ("length", None),
    ("prompt", None),
    ("prompt_embed", None),
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- meshes


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, int]:
    """`(data, model)` with a -1 entry replaced by what the other leaves of `num_devices`.

    Raises ValueError for a malformed shape or one that cannot split the devices evenly.
    """
    shape = tuple(mesh_shape)
    if len(shape) != 2 or not all(isinstance(s, (int, np.integer)) for s in shape):
        raise ValueError(f"MESH_SHAPE must be two integers (data, model), got {mesh_shape!r}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {shape}: sizes must be positive, with at most one -1")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            name = MESH_AXES[shape.index(-1) ^ 1]
            raise ValueError(f"mesh {shape}: {num_devices} devices cannot be split evenly into "
                             f"{name}={known}")
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    return int(shape[0]), int(shape[1])


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices: Sequence[Any] | None = None) -> Mesh:
    """A `('data', 'model')` mesh over `devices` (default: all devices of all processes).

    One entry may be -1: it takes whatever the other leaves. Raises ValueError when the
    shape does not use exactly the devices at hand.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = resolve_mesh_shape(mesh_shape, n)
    needed = math.prod(shape)
    if needed > n:
        raise ValueError(f"mesh {shape} needs {needed} devices, {n} available")
    if needed < n:
        raise ValueError(f"mesh {shape} uses {needed} of the {n} available devices; use -1 "
                         f"for one axis (e.g. (-1, {shape[1]})) or a shape whose product is {n}")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices)


def check_batch_size(batch_size: int, data_parallel: int, what: str = "BATCH_SIZE") -> None:
    """A batch must split evenly over the data-parallel devices."""
    if batch_size % data_parallel:
        raise ValueError(f"{what}={batch_size} is not divisible by the data-parallel size "
                         f"{data_parallel} (MESH_SHAPE's first entry)")


# ------------------------------------------------------------- logical -> mesh specs


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int],
                    axis_sizes: dict[str, int], rules: Rules = LOGICAL_AXIS_RULES,
                    what: str = "array") -> P:
    """The mesh PartitionSpec of an array with logical axis `names` and `shape`.

    Decision on indivisible dimensions: a dimension whose size is not a multiple of its mesh
    axis' size is replicated instead (with a warning) rather than raising as t5x does, so
    that e.g. T5 1.1 small's 6 heads still run on `model=4`; the memory report shows the
    cost. `axis_sizes` is `mesh.shape` (or a hypothetical mesh's sizes for a dry run).
    """
    spec = list(nn.logical_to_mesh_axes(tuple(names), rules))
    for i, axes in enumerate(spec):
        if axes is None:
            continue
        size = math.prod(axis_sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
        if shape[i] % size:
            _warn_once(f"{what}: dimension {i} ({names[i]}, size {shape[i]}) is not divisible "
                       f"by mesh axis {axes} (size {size}); replicating it")
            spec[i] = None
    return P(*spec)


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


def _is_boxed(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def params_specs(abstract_boxed_params: Any, axis_sizes: dict[str, int],
                 rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """PartitionSpecs for the unboxed tree of `t5.model.abstract_params(..., boxed=True)`.

    Leaves boxed as `nn.LogicallyPartitioned` map through `rules`; plain leaves (and
    `nn.Partitioned`, whose names are already mesh axes) are taken as they are.
    """

    def spec(path, leaf):
        what = jax.tree_util.keystr(path, simple=True, separator="/")
        if isinstance(leaf, nn.LogicallyPartitioned):
            return logical_to_spec(leaf.names, leaf.value.shape, axis_sizes, rules, what)
        if isinstance(leaf, nn.Partitioned):
            return P(*leaf.names)
        return P()

    return jax.tree_util.tree_map_with_path(spec, abstract_boxed_params, is_leaf=_is_boxed)


def to_shardings(mesh: Mesh, specs: Any) -> Any:
    """A tree of PartitionSpecs -> NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def params_shardings(mesh: Mesh, abstract_boxed_params: Any,
                     rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for the unboxed parameter tree, per `rules` (see `params_specs`)."""
    return to_shardings(mesh, params_specs(abstract_boxed_params, dict(mesh.shape), rules))


# ----------------------------------------------------------------- optimizer state


def _key_name(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def _drop(spec: P, shape: Sequence[int], dim: int) -> P:
    full = tuple(spec) + (None,) * (len(shape) - len(spec))
    return P(*(full[:dim] + full[dim + 1:]))


def _state_leaf_spec(names: tuple, leaf: Any, param: Any, spec: P) -> P:
    """A state leaf's spec from its parameter's: same shape -> same spec; Adafactor's
    factored `v_row`/`v_col` -> the spec minus the reduced dimension; else replicated."""
    shape, pshape = tuple(leaf.shape), tuple(param.shape)
    if shape == pshape:
        return spec
    if len(shape) != len(pshape) - 1:
        return P()
    # optax's `_factored_dims`: d0 is the largest dimension, d1 the second largest;
    # v_row reduces d0, v_col reduces d1. Used when the state names them (decides ties
    # between equal dimensions, e.g. XXL's square [4096, 4096] attention kernels).
    if len(pshape) >= 2 and ("v_row" in names or "v_col" in names):
        d1, d0 = (int(d) for d in np.argsort(pshape)[-2:])
        dim = d0 if "v_row" in names else d1
        if pshape[:dim] + pshape[dim + 1:] == shape:
            return _drop(spec, pshape, dim)
    candidates = {_drop(spec, pshape, d) for d in range(len(pshape))
                  if pshape[:d] + pshape[d + 1:] == shape}
    return candidates.pop() if len(candidates) == 1 else P()


def opt_state_specs(tx: optax.GradientTransformation, abstract_trainable: Any,
                    trainable_specs: Any) -> Any:
    """PartitionSpecs for `tx.init(trainable)`, derived from the parameters' specs.

    A state leaf belongs to the parameter whose path is a suffix of the leaf's path (optax
    keeps per-parameter state as copies of the parameter tree). Scalars, step counters and
    optax's `(1,)` placeholders are replicated.
    """
    abstract_state = jax.eval_shape(tx.init, abstract_trainable)
    param_leaves = jax.tree_util.tree_flatten_with_path(abstract_trainable)[0]
    spec_leaves = jax.tree.leaves(trainable_specs, is_leaf=lambda x: isinstance(x, P))
    by_path = {tuple(_key_name(k) for k in path): (leaf, spec)
               for (path, leaf), spec in zip(param_leaves, spec_leaves, strict=True)}
    depths = sorted({len(p) for p in by_path}, reverse=True)

    def spec_of(path, leaf):
        names = tuple(_key_name(k) for k in path)
        for depth in depths:  # the longest parameter path that ends this state path
            if len(names) >= depth and names[len(names) - depth:] in by_path:
                param, spec = by_path[names[len(names) - depth:]]
                return _state_leaf_spec(names[:len(names) - depth], leaf, param, spec)
        return P()

    return jax.tree_util.tree_map_with_path(spec_of, abstract_state)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_trainable: Any,
                        trainable_shardings: Any) -> Any:
    """NamedShardings for `tx.init(trainable)` (see `opt_state_specs`)."""
    leaves = jax.tree.leaves(trainable_shardings)
    if not leaves:
        raise ValueError("opt_state_shardings: no trainable parameters")
    mesh = leaves[0].mesh
    specs = jax.tree.map(lambda s: s.spec, trainable_shardings)
    return to_shardings(mesh, opt_state_specs(tx, abstract_trainable, specs))


# ------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Batch dimension on the mesh axis `rules` give `batch` ('data'); the rest replicated."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def _mesh_axes(sharding: NamedSharding) -> tuple[str, ...]:
    """The mesh axes of a sharding's first dimension."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _batch_axis_positions(mesh: Mesh, rules: Rules) -> tuple[list[int], int]:
    """(sorted batch-shard positions this process's devices hold, number of batch shards)."""
    axes = _mesh_axes(batch_sharding(mesh, rules))
    names = list(mesh.axis_names)
    count = math.prod(mesh.shape[a] for a in axes)
    positions = set()
    for index in np.ndindex(mesh.devices.shape):
        if mesh.devices[index].process_index == jax.process_index():
            pos = 0
            for a in axes:
                pos = pos * mesh.shape[a] + index[names.index(a)]
            positions.add(pos)
    return sorted(positions), count


def data_shard(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> tuple[int, int]:
    """(index, num_shards) of the data this process reads: seqio's `ShardInfo`.

    Processes whose devices hold the same batch rows (model parallelism across hosts)
    get the same index and must read the same examples.
    """
    positions, count = _batch_axis_positions(mesh, rules)
    k = len(positions)
    if positions != list(range(positions[0], positions[0] + k)) or positions[0] % k:
        raise ValueError(f"mesh {dict(mesh.shape)}: process {jax.process_index()} holds "
                         f"batch shards {positions}, not one contiguous block; arrange the "
                         "devices so that each process's data shards are adjacent")
    return positions[0] // k, count // k


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh,
                 rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, jax.Array]:
    """This process's batch `{feature: [B_local, ...]}` -> global arrays `[B, ...]` on `mesh`.

    B = B_local x num_shards of `data_shard(mesh)`; B must divide by the data-parallel size.
    """
    _, num_shards = data_shard(mesh, rules)
    sharding = batch_sharding(mesh, rules)
    data_size = math.prod(mesh.shape[a] for a in _mesh_axes(sharding))
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        n = x.shape[0] * num_shards
        if n % data_size:
            where = f" ({x.shape[0]} per process x {num_shards})" if num_shards > 1 else ""
            raise ValueError(f"global batch size {n}{where} of {name!r} is not divisible by "
                             f"the data-parallel size {data_size} (mesh {dict(mesh.shape)})")
        out[name] = jax.make_array_from_process_local_data(sharding, x, (n,) + x.shape[1:])
    return out


def whole_batch(batch: dict[str, np.ndarray], mesh: Mesh,
                rules: Rules = LOGICAL_AXIS_RULES) -> dict[str, jax.Array]:
    """A batch every process holds whole (an eval or infer batch) -> global arrays with the
    batch dimension on `data`, as `global_batch` places a train batch: each device receives
    only its rows. The batch size must divide by the data-parallel size."""
    sharding = batch_sharding(mesh, rules)
    data_size = math.prod(mesh.shape[a] for a in _mesh_axes(sharding))
    out = {}
    for name, x in batch.items():
        x = np.asarray(x)
        check_batch_size(x.shape[0], data_size, f"batch of {name!r}")
        out[name] = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
    return out


# ----------------------------------------------------------------- placing params


def shard_params(host_params: Any, shardings: Any, dtype: Any = None) -> Any:
    """Place a host tree (numpy arrays, or anything sliceable like them) on the mesh.

    Only the slices this process's devices hold are read and copied, one per device, so a
    checkpoint far larger than one device never exists whole on any device. `dtype`
    (e.g. bfloat16 for frozen weights) casts each slice on the way.
    """

    def place(x, sharding):
        cast = (lambda a: a) if dtype is None else (lambda a: np.asarray(a).astype(dtype))
        return jax.make_array_from_callback(
            tuple(x.shape), sharding, lambda index: cast(np.asarray(x[index])))

    return jax.tree.map(place, host_params, shardings)


# --------------------------------------------------------------- activations, jit


def sharded_jit(fn: Callable[..., Any], mesh: Mesh, in_shardings: Any, out_shardings: Any,
                *, rules: Rules = LOGICAL_AXIS_RULES, **jit_kwargs: Any) -> Callable[..., Any]:
    """`jax.jit(fn, in_shardings, out_shardings)` whose trace has the activation constraints.

    `jit_kwargs` pass through (`donate_argnums`, `static_argnums`, ...).
    """

    @functools.wraps(fn)
    def in_context(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return jax.jit(in_context, in_shardings=in_shardings, out_shardings=out_shardings,
                   **jit_kwargs)


# ---------------------------------------------------------------------- multi-host


def initialize_distributed(num_processes: int | None = None, process_id: int | None = None,
                           coordinator_address: str | None = None) -> bool:
    """`jax.distributed.initialize` when more than one process is asked for.

    Each argument falls back to `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`,
    `JAX_COORDINATOR_ADDRESS`. A no-op (returns False) for a single process; call it before
    anything touches a device. CPU collectives use gloo.
    """
    env = os.environ.get
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    coordinator_address = coordinator_address or env("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and coordinator_address is None:
        return False
    if num_processes is not None and num_processes <= 1:
        return False
    if coordinator_address is None:
        raise ValueError(f"NUM_PROCESSES={num_processes} needs COORDINATOR_ADDRESS "
                         "(host:port of process 0), or JAX_COORDINATOR_ADDRESS")
    if process_id is not None and num_processes is not None and not (
            0 <= process_id < num_processes):
        raise ValueError(f"PROCESS_ID={process_id} is outside [0, {num_processes})")
    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    if not re.fullmatch(r"\d+", value.strip()):
        raise ValueError(f"{name}={value!r} is not a non-negative integer")
    return int(value)
