"""The frozen T5 backbone."""

from prompt_jax.t5.config import SIZES, T5Config, get_config
from prompt_jax.t5.model import T5

__all__ = ["SIZES", "T5", "T5Config", "get_config"]
