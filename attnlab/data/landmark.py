"""Data side of landmark attention (Mohtashami & Jaggi 2023): landmark insertion, labels, random windows.

Reference: epfml/landmark-attention ``lm_benchmark/data/utils.py::add_mem_tokens`` (a landmark after every
``mem_freq`` tokens) and ``lm_benchmark/optim/utils.py::get_batch`` (windows at uniformly random offsets, so the
landmarks of a training window are not block-aligned; a landmark is never predicted and never a loss position).
Host-side NumPy, vectorised.
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


def next_token_targets(inputs: np.ndarray, is_special: np.ndarray, ignore_id: int = -1):
  """Next-token targets that skip special tokens (landmarks, meta tokens).

  ``target[t]`` = the first non-special token after ``t``; ``weight[t] = 0`` where ``inputs[t]`` is special or
  no such token exists in the array (``target = ignore_id`` there). So the token before a landmark predicts the
  token after it, and special tokens are neither predicted nor loss positions.

  Args:
    inputs: (..., n) int; is_special: bool, broadcastable to ``inputs``.

  Returns:
    ``(targets, weights)``: int array and float32 0/1 array, both shaped like ``inputs``.
  """
  inputs = np.asarray(inputs)
  special = np.broadcast_to(np.asarray(is_special, bool), inputs.shape)
  n = inputs.shape[-1]
  idx = np.broadcast_to(np.arange(n), inputs.shape)
  real = np.where(special, n, idx)
  nxt = np.minimum.accumulate(real[..., ::-1], axis=-1)[..., ::-1]  # first real index >= t
  nxt = np.concatenate([nxt[..., 1:], np.full(inputs.shape[:-1] + (1,), n)], axis=-1)  # ... > t
  ok = (nxt < n) & ~special
  targets = np.where(ok, np.take_along_axis(inputs, np.minimum(nxt, n - 1), axis=-1), ignore_id)
  return targets, ok.astype(np.float32)


def landmark_windows(stream: np.ndarray, *, landmark_id: int, block_size: int, seq_len: int, batch: int,
                     rng: np.random.Generator, ignore_id: int = -1) -> dict[str, np.ndarray]:
  """A training batch of windows at random offsets of a landmark-augmented token stream.

  Landmarks are inserted into the whole 1-D ``stream`` (global block grid), then ``batch`` windows of
  ``seq_len`` tokens start at uniformly random offsets, so their landmarks are not block-aligned.

  Returns:
    dict with ``inputs`` (batch, seq_len) int32, ``targets`` (batch, seq_len) int32 (next non-landmark token)
    and ``weights`` (batch, seq_len) float32 (0 at landmark inputs).
  """
  aug, is_lm = insert_landmarks(np.asarray(stream).reshape(-1), landmark_id, block_size)
  span = seq_len + 2  # the last input's target may sit behind a landmark
  if aug.shape[0] < span:
    raise ValueError(f"stream too short: {aug.shape[0]} tokens with landmarks, need >= {span}")
  starts = rng.integers(0, aug.shape[0] - span + 1, size=batch)
  rows = starts[:, None] + np.arange(span)
  windows, special = aug[rows], is_lm[rows]
  targets, weights = next_token_targets(windows, special, ignore_id)
  return dict(inputs=windows[:, :seq_len].astype(np.int32), targets=targets[:, :seq_len].astype(np.int32),
              weights=weights[:, :seq_len])
