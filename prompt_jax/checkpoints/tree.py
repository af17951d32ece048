"""Checking a loaded parameter tree against the model a config describes."""

from __future__ import annotations

from typing import Any

import numpy as np

from prompt_jax.pytree import flatten
from prompt_jax.t5.config import PROMPT_PATH, T5Config

__all__ = ["PROMPT_PATH", "cast_params", "check_params", "expected_shapes"]


def cast_params(params: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Every leaf as a numpy array of `dtype` (e.g. bfloat16 frozen weights)."""
    from prompt_jax.pytree import unflatten

    # copy=False: a checkpoint already in `dtype` is not copied (XXL weights are 20+ GiB).
    return unflatten({k: np.asarray(v).astype(dtype, copy=False)
                      for k, v in flatten(params).items()})


def expected_shapes(config: T5Config, prompt_length: int = 0, model: Any = None
                    ) -> dict[str, tuple[int, ...]]:
    """Every parameter path of `T5(config)` (or of `model`, see `abstract_params`) and its
    shape, without allocating."""
    from prompt_jax.t5.model import abstract_params  # late: model imports prompts

    tree = abstract_params(config, prompt_length, model=model)
    return {k: tuple(v.shape) for k, v in flatten(tree).items()}


def check_params(params: dict[str, Any], config: T5Config, source: str,
                 prompt_length: int = 0, model: Any = None) -> None:
    """Raise ValueError naming `source` and the parameter of a missing, extra or misshapen leaf."""
    want = expected_shapes(config, prompt_length, model)
    have = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing:
        raise ValueError(f"{source}: parameter {missing[0]} missing (expected shape "
                         f"{want[missing[0]]}); {len(missing)} missing in all")
    if extra:
        raise ValueError(f"{source}: unexpected parameter {extra[0]} with shape "
                         f"{have[extra[0]]}; {len(extra)} unexpected in all")
    for name in want:
        if want[name] != have[name]:
            raise ValueError(f"{source}: parameter {name} has shape {have[name]}, "
                             f"expected {want[name]}")
