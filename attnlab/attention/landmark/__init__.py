"""Landmark attention (Mohtashami & Jaggi 2023): grouped-softmax training attention and retrieval inference.

The LM-level chunked runner (scoring and greedy decoding of long contexts) is
:mod:`attnlab.attention.landmark.runner`; the module/config are in :mod:`attnlab.attention.variants.landmark`.
"""

from attnlab.attention.landmark.grouped_softmax import block_ids, grouped_softmax_weights, landmark_attention
from attnlab.attention.landmark.retrieval import SELECTIONS, LandmarkCache, init_cache, retrieval_attention

__all__ = ["SELECTIONS", "LandmarkCache", "block_ids", "grouped_softmax_weights", "init_cache",
           "landmark_attention", "retrieval_attention"]
