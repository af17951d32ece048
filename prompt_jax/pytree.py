"""Parameter trees as flat `{'encoder/layers_0/attention/query/kernel': leaf}` dicts."""

from __future__ import annotations

from typing import Any

import flax


def flatten(tree: Any) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}."""
    return flax.traverse_util.flatten_dict(dict(tree), sep="/") if tree else {}


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{'a/b/c': leaf} -> nested plain dicts."""
    return flax.traverse_util.unflatten_dict(flat, sep="/")
