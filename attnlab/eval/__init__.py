"""Evaluation: held-out perplexity / bits-per-byte, length extrapolation, passkey retrieval."""

from attnlab.eval.config import EvalConfig
from attnlab.eval.lm_eval import evaluate_batches
from attnlab.eval.run import evaluate_workdir, run_evaluation

__all__ = ["EvalConfig", "evaluate_batches", "evaluate_workdir", "run_evaluation"]
