"""Naive float64 references for the sink metrics, transcribed from the authors' evaluation code."""

import numpy as np


def gu_importance(a: np.ndarray) -> np.ndarray:
  """Gu et al. ``eval_sink_open_source.py``: (..., T_q, T_k) causal weights -> (..., T_k) mean attention received."""
  t = a.shape[-1]
  return (np.asarray(a, np.float64) / np.arange(t, 0, -1, dtype=np.float64)).sum(-2)


def gu_proxy(a: np.ndarray) -> np.ndarray:
  a = np.abs(np.asarray(a, np.float64))
  return a / (a.sum(-1, keepdims=True) + 1e-8)


def norm_ratio(x: np.ndarray, j: int) -> np.ndarray:
  """(batch, seq, ..., dim) -> ||x_j|| / mean_{t != j} ||x_t|| per sample."""
  n = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
  others = np.delete(n, j, axis=1).mean(1)
  return n[:, j] / others
