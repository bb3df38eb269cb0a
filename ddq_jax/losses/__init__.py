"""ddq_jax.losses."""
