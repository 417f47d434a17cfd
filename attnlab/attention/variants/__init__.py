"""Attention modules. Importing this package registers every variant (one import line per variant)."""

from attnlab.attention.variants import dot_product  # noqa: F401
from attnlab.attention.variants import landmark  # noqa: F401
from attnlab.attention.variants import meta_tokens  # noqa: F401
from attnlab.attention.variants import lightning  # noqa: F401
from attnlab.attention.variants import routing  # noqa: F401
from attnlab.attention.variants import cca  # noqa: F401
