"""Landmark insertion into a token sequence (Mohtashami & Jaggi 2023), used at inference (retrieval runner,
passkey eval). Training batches get their landmarks from :mod:`attnlab.data.special_tokens` (random offsets).

Reference: epfml/landmark-attention ``lm_benchmark/data/utils.py::add_mem_tokens`` (a landmark after every
``mem_freq`` tokens). Host-side NumPy, vectorised.
"""

from __future__ import annotations

import numpy as np


def insert_landmarks(tokens: np.ndarray, landmark_id: int, block_size: int, phase: int = 0):
  """Inserts ``landmark_id`` after every ``block_size - 1`` tokens along the last axis.

  Args:
    tokens: (..., n) int array.
    landmark_id: the landmark token id.
    block_size: tokens per block, landmark included (paper: 51).
    phase: tokens already in the first (open) block, 0 <= phase < block_size - 1.

  Returns:
    ``(out, is_landmark)``: (..., n + (phase + n) // (block_size - 1)) tokens and the (n_out,) landmark mask
    (the same for every row).
  """
  tokens = np.asarray(tokens)
  m = block_size - 1
  if m < 1:
    raise ValueError(f"block_size (landmark included) must be >= 2; got {block_size}")
  if not 0 <= phase < m:
    raise ValueError(f"phase must be in [0, block_size - 1 = {m}); got {phase}")
  n = tokens.shape[-1]
  idx = np.arange(n)
  dest = idx + (phase + idx) // m
  n_out = n + (phase + n) // m
  out = np.full(tokens.shape[:-1] + (n_out,), landmark_id, dtype=tokens.dtype)
  out[..., dest] = tokens
  is_landmark = np.ones(n_out, bool)
  is_landmark[dest] = False
  return out, is_landmark
