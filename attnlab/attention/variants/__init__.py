"""Attention modules. Importing this package registers every variant (one import line per variant)."""

from attnlab.attention.variants import dot_product  # noqa: F401
from attnlab.attention.variants import cca  # noqa: F401
