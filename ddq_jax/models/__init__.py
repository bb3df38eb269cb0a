"""ddq_jax.models."""
