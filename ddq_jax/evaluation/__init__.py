"""ddq_jax.evaluation."""
