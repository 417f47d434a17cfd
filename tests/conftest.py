import os

# Keep the suite on one predictable CPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
