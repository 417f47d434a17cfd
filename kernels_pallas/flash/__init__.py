"""Flash attention with a pluggable score function: GPU (Triton-style) and TPU (Mosaic-style) Pallas kernels.

Layout (tokamax style): ``config.py`` block sizes, ``common.py`` the block math both kernels share, ``gpu.py`` and
``tpu.py`` the kernels, ``api.py`` dispatch + custom_vjp, ``reference.py`` the pure-jnp reference.
"""

from kernels_pallas.flash.api import default_backend, flash_attention, flash_unsupported
from kernels_pallas.flash.config import BlockSizes
from kernels_pallas.flash.reference import flash_reference

__all__ = ["BlockSizes", "default_backend", "flash_attention", "flash_reference", "flash_unsupported"]
