"""Evaluation: held-out perplexity / bits-per-byte (``lm_eval``), length extrapolation (``extrapolation``),
passkey retrieval (``passkey``); ``run.run_evaluation`` / ``run.evaluate_workdir`` write ``eval.json``."""

from attnlab.eval.config import EvalConfig

__all__ = ["EvalConfig"]
