"""ddq_jax.ops."""
