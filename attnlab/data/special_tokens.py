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
  ``rate`` (Shah et al. 2025; RECONSTRUCTION: there is no public code, see shared/research/variants.md §2);
  the row is cut back to ``seq_len`` (static shapes), so plain rows are read ``seq_len`` long.

``DataConfig.special_tokens`` selects the transform; ``ExperimentConfig`` fills it in from the model's attention
config (``LandmarkConfig`` / ``MetaTokenConfig`` provide ``special_tokens()``), so one config line switches both.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from attnlab.data.packing import Batch, segment_positions


@dataclasses.dataclass(frozen=True)
class LandmarkTokens:
  """Landmark insertion: ``block_size`` counts the landmark (``block_size - 1`` ordinary tokens per block)."""

  block_size: int
  landmark_id: int

  def __post_init__(self):
    if self.block_size < 2:
      raise ValueError(f"LandmarkTokens.block_size (landmark included) must be >= 2; got {self.block_size}")

  @property
  def ids(self) -> tuple[int, ...]:
    return (self.landmark_id,)

  def source_len(self, seq_len: int) -> int:
    n = seq_len - math.ceil(seq_len / self.block_size)
    if n < 2:
      raise ValueError(f"seq_len {seq_len} leaves fewer than 2 ordinary tokens with block_size {self.block_size}")
    return n

  def layout(self, rng: np.random.Generator, batch: int, n: int, seq_len: int):
    """(dest (batch, n), special ids (batch, seq_len)); slots that are neither get PAD."""
    offset = rng.integers(0, self.block_size, size=batch)
    is_lm = (np.arange(seq_len)[None, :] + offset[:, None]) % self.block_size == self.block_size - 1
    dest = np.stack([np.flatnonzero(~row)[:n] for row in is_lm])
    return dest, np.where(is_lm, self.landmark_id, -1)


@dataclasses.dataclass(frozen=True)
class MetaTokens:
  """Meta-token injection before each ordinary token with probability ``rate`` (ids uniform over ``meta_ids``)."""

  meta_ids: tuple[int, ...]
  rate: float

  def __post_init__(self):
    object.__setattr__(self, "meta_ids", tuple(int(i) for i in np.atleast_1d(self.meta_ids)))
    if not self.meta_ids:
      raise ValueError("MetaTokens.meta_ids must name at least one token id")
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"MetaTokens.rate must be in [0, 1); got {self.rate}")

  @property
  def ids(self) -> tuple[int, ...]:
    return self.meta_ids

  def source_len(self, seq_len: int) -> int:
    return seq_len

  def layout(self, rng: np.random.Generator, batch: int, n: int, seq_len: int):
    insert = rng.random((batch, n)) < self.rate  # a meta token right before plain token t
    dest = np.arange(n)[None, :] + np.cumsum(insert, axis=1)
    ids = np.asarray(self.meta_ids)[rng.integers(0, len(self.meta_ids), (batch, seq_len))]
    return dest, ids  # every slot < seq_len not hit by dest follows an insertion: a meta token


SpecialTokens = LandmarkTokens | MetaTokens


def interleave(batch: Batch, spec: SpecialTokens, *, seq_len: int, rng: np.random.Generator, pad_id: int) -> Batch:
  """The batch with ``spec``'s special tokens interleaved (see the module docstring); (batch, seq_len) arrays."""
  inputs = np.asarray(batch["inputs"])
  b, n = inputs.shape
  if batch.get("segment_ids") is None:
    raise ValueError("special tokens are interleaved before whole-row batching: segment_ids must be present")
  dest, special = spec.layout(rng, b, n, seq_len)
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
