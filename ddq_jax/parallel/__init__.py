"""ddq_jax.parallel."""
