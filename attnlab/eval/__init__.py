"""Evaluation: held-out perplexity / bits-per-byte (``lm_eval``), length extrapolation (``extrapolation``),
passkey retrieval (``passkey``); ``run.run_evaluation`` writes ``eval.json``;
``landmark_runner`` runs landmark-attention LMs chunk by chunk with top-k retrieval."""

from attnlab.eval.config import EvalConfig

__all__ = ["EvalConfig"]
