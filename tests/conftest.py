import os

import jax

# One predictable CPU backend with 8 virtual devices, so sharding (DP / FSDP / TP) is testable on a laptop.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
