"""ddq_jax.io.conversion."""
