"""Data side of meta tokens (Shah et al. 2025): learned meta-token ids injected at random positions.

RECONSTRUCTION (no public code; shared/research/variants.md §2): before each original token a meta token is
inserted with probability ``rate`` (id drawn uniformly from ``meta_ids``); rows are cut back to their length so
batches keep a static shape. Meta tokens are excluded from the loss: they are never targets (the token before
one predicts the next ordinary token) and never loss positions.
"""

from __future__ import annotations

import numpy as np

from attnlab.data.landmark import next_token_targets


def inject_meta_tokens(tokens: np.ndarray, meta_ids, rate: float, rng: np.random.Generator):
  """Returns ``(out, is_meta)``, both (batch, n): ``tokens`` (batch, n) with meta tokens injected, truncated."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, n); got shape {tokens.shape}")
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate must be in [0, 1); got {rate}")
  meta_ids = np.asarray(meta_ids).reshape(-1)
  if meta_ids.size == 0:
    raise ValueError("meta_ids must name at least one token id")
  b, n = tokens.shape
  insert = rng.random((b, n)) < rate  # a meta token goes right before token i
  shift = np.cumsum(insert, axis=1)
  rows = np.arange(b)[:, None]
  out = np.zeros((b, 2 * n), tokens.dtype)
  is_meta = np.zeros((b, 2 * n), bool)
  out[rows, np.arange(n) + shift] = tokens
  meta_pos = np.where(insert, np.arange(n) + shift - 1, 2 * n)  # out of range -> not written
  ids = meta_ids[rng.integers(0, meta_ids.size, (b, n))]
  keep = meta_pos < 2 * n
  out[np.broadcast_to(rows, (b, n))[keep], meta_pos[keep]] = ids[keep]
  is_meta[np.broadcast_to(rows, (b, n))[keep], meta_pos[keep]] = True
  return out[:, :n], is_meta[:, :n]


def meta_token_batch(tokens: np.ndarray, *, meta_ids, rate: float, rng: np.random.Generator,
                     ignore_id: int = -1) -> dict[str, np.ndarray]:
  """LM batch with injected meta tokens. ``tokens`` (batch, n + 1): ``inputs`` are n tokens, ``targets`` the next
  ordinary token, ``weights`` 0 at meta inputs (and where no target is left in the row)."""
  seq, is_meta = inject_meta_tokens(tokens, meta_ids, rate, rng)
  targets, weights = next_token_targets(seq, is_meta, ignore_id)
  n = seq.shape[1] - 1
  return dict(inputs=seq[:, :n].astype(np.int32), targets=targets[:, :n].astype(np.int32), weights=weights[:, :n])
