"""ddq_jax.data."""
