"""ddq_jax.train."""
