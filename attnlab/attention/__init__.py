"""Attention: score functions, the dense reference, the backend dispatch (``attend``), configs and variants."""

from attnlab.ops.dense import attention_weights
from attnlab.attention.dispatch import attend
from attnlab.ops.scores import available_scores, get_score, register_score

__all__ = ["attend", "attention_weights", "available_scores", "get_score", "register_score"]
