"""prompt_jax: prompt tuning (Lester et al., 2021) on a frozen T5, in JAX/Flax.

Public interface:
  load_checkpoint(path) -> (T5Config, params)   HF directory or t5x checkpoint
  save_hf(config, params, path)                  write an HF T5 directory
  T5(config)                                     the linen module
  get_config(name, **overrides)                  named sizes
"""

from prompt_jax.checkpoints import load_checkpoint, save_hf
from prompt_jax.t5 import SIZES, T5, T5Config, get_config

__all__ = ["SIZES", "T5", "T5Config", "get_config", "load_checkpoint", "save_hf"]
