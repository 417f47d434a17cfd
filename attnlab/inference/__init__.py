"""Inference over the cache protocol: generation and cache sharding."""

from attnlab.inference.generate import TRACE_COUNTS, cache_shardings, generate, sample

__all__ = ["TRACE_COUNTS", "cache_shardings", "generate", "sample"]
