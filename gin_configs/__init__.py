"""Registry of gin files shipped with prompt_jax (see gin_configs/)."""
