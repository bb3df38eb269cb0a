"""ddq_jax.train.parallel."""
