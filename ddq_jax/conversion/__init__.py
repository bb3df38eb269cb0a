"""ddq_jax.conversion."""
