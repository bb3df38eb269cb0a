"""ddq_jax.training."""
