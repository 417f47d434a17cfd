"""Attention: the functional core, score functions, masks, and the registry of attention modules."""

from attnlab.attention.core import attend, attention_weights
from attnlab.attention.scores import available_scores, get_score, register_score

__all__ = ["attend", "attention_weights", "available_scores", "get_score", "register_score"]
