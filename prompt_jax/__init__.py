"""prompt_jax: prompt tuning on a frozen T5, in JAX/Flax."""
