"""Pallas lightning-attention kernel (forward + backward under ``custom_vjp``). Pure-jnp references:
``attnlab.ops.lightning.lightning_naive`` (dense) and ``lightning_chunked`` (same block algorithm)."""

from kernels_pallas.lightning.kernel import lightning_attention

__all__ = ["lightning_attention"]
