"""Pallas kernels for attnlab (GPU and TPU), each with a pure-jnp reference; tested on CPU in interpret mode."""
