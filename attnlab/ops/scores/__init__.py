"""Score functions: one file each; importing this package registers them all."""

from attnlab.ops.scores.registry import (ScoreContext, ScoreFunction, available_scores, get_score,
                                               register_score)
from attnlab.ops.scores import relu, sigmoid, softmax, softplus, softpick  # noqa: F401  (registration)

__all__ = ["ScoreContext", "ScoreFunction", "available_scores", "get_score", "register_score"]
