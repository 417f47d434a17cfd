"""Special tokens interleaved into model batches: landmark tokens and meta tokens.

A batch transform maps a plain LM batch (``inputs``, ``targets``, ``loss_mask``, ``segment_ids``, ``positions``,
all (batch, n)) to a batch of ``seq_len`` inputs where every plain input ``x_t`` moves to a new slot ``dest(t)``
and the other slots hold special tokens. The plain input keeps its target and loss weight, so the token before a
special token predicts the next ordinary token; special inputs are never loss positions and never targets
(Mohtashami & Jaggi 2023, reference ``get_batch``: ``y = -1`` where the input is a landmark). A special token
takes the segment id of the ordinary token before it (a landmark closes its own document's block); positions
are recounted, so special tokens occupy positions like any token (as in the reference's augmented stream).

* :class:`LandmarkTokens`: a landmark at every slot ``p`` with ``(p + o) % B == B - 1`` for a random offset
  ``o ∈ [0, B)`` per row (random training-window offsets; a row may open with a landmark). Plain rows are read
  ``source_len(seq_len) = seq_len - ceil(seq_len / B)`` tokens long, so nothing is cut off (a row's free last
  slot, if any, is PAD).
* :class:`MetaTokens`: a meta token (id uniform over ``meta_ids``) before each plain token with probability
  ``rate`` (Shah et al. 2025, arXiv 2509.16278; a reconstruction: the authors published no code);
  the row is cut back to ``seq_len`` (static shapes), so plain rows are read ``seq_len`` long.

The token specs themselves (:mod:`attnlab.attention.special_tokens`) are what the attention configs declare.

``DataConfig.special_tokens`` selects the transform; ``ExperimentConfig`` fills it in from the model's attention
config (``LandmarkConfig`` / ``MetaTokenConfig`` provide ``special_tokens()``), so one config line switches both.
"""

from __future__ import annotations

import numpy as np

from attnlab.attention.special_tokens import LandmarkTokens, MetaTokens, SpecialTokens
from attnlab.data.packing import Batch, segment_positions


def layout(spec: SpecialTokens, rng: np.random.Generator, batch: int, n: int, seq_len: int):
  """(dest (batch, n), special ids (batch, seq_len)): the slot of each plain token, and the special id of every
  slot (-1 where there is none; slots that are neither get PAD).

  Landmarks sit at every slot ``p`` with ``(p + o) % B == B - 1`` for a random offset ``o`` per row; a meta token
  goes right before plain token ``t`` with probability ``rate``.
  """
  if isinstance(spec, LandmarkTokens):
    offset = rng.integers(0, spec.block_size, size=batch)
    is_lm = (np.arange(seq_len)[None, :] + offset[:, None]) % spec.block_size == spec.block_size - 1
    dest = np.stack([np.flatnonzero(~row)[:n] for row in is_lm])
    return dest, np.where(is_lm, spec.landmark_id, -1)
  insert = rng.random((batch, n)) < spec.rate
  dest = np.arange(n)[None, :] + np.cumsum(insert, axis=1)
  ids = np.asarray(spec.meta_ids)[rng.integers(0, len(spec.meta_ids), (batch, seq_len))]
  return dest, ids  # every slot < seq_len not hit by dest follows an insertion: a meta token


def interleave(batch: Batch, spec: SpecialTokens, *, seq_len: int, rng: np.random.Generator, pad_id: int) -> Batch:
  """The batch with ``spec``'s special tokens interleaved (see the module docstring); (batch, seq_len) arrays."""
  inputs = np.asarray(batch["inputs"])
  b, n = inputs.shape
  if batch.get("segment_ids") is None:
    raise ValueError("special tokens are interleaved before whole-row batching: segment_ids must be present")
  dest, special = layout(spec, rng, b, n, seq_len)
  keep = dest < seq_len
  rows = np.broadcast_to(np.arange(b)[:, None], dest.shape)[keep]
  cols = dest[keep]

  def scatter(x, fill, dtype):
    out = np.full((b, seq_len), fill, dtype)
    out[rows, cols] = np.asarray(x)[keep]
    return out

  is_plain = scatter(np.ones_like(inputs, bool), False, bool)
  is_special = ~is_plain & (special >= 0)
  new_inputs = np.where(is_special, special, scatter(inputs, pad_id, np.int32)).astype(np.int32)
  targets = scatter(batch["targets"], pad_id, np.int32)
  loss_mask = scatter(batch["loss_mask"], 0.0, np.float32)
  seg = scatter(batch["segment_ids"], 0, np.int32)
  # a special token joins the segment of the last plain token before it (the first plain token's, at the start)
  idx = np.broadcast_to(np.arange(seq_len), (b, seq_len))
  last = np.maximum.accumulate(np.where(is_plain, idx, -1), axis=1)
  first = np.argmax(is_plain, axis=1)[:, None]
  src = np.where(last >= 0, last, first)
  seg = np.where(is_special, np.take_along_axis(seg, src, axis=1), seg).astype(np.int32)
  return {"inputs": new_inputs, "targets": targets, "segment_ids": seg, "positions": segment_positions(seg),
          "loss_mask": loss_mask}
