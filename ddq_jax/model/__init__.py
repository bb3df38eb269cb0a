"""ddq_jax.model."""
