"""Packing documents into fixed-length rows, and rows into model batches.

Every document becomes ``[BOS] tokens [EOS]``; a document longer than a row is cut into chunks that each start
with BOS. Chunks are packed greedily, in order, into rows of ``seq_len + 1`` tokens (inputs = row[:-1],
targets = row[1:]); the rest of a row is PAD. ``segment_ids`` number the chunks of a row from 1 (0 = PAD), so
attention never crosses a document boundary and positions restart at every BOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]


class Packer:
  """Incremental greedy packer: ``add(doc_tokens)`` returns the rows completed by that document."""

  def __init__(self, seq_len: int, *, bos_id: int, eos_id: int, pad_id: int):
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2; got {seq_len}")
    self.row_len, self.bos, self.eos, self.pad = seq_len + 1, bos_id, eos_id, pad_id
    self._tok: list[np.ndarray] = []
    self._seg: list[np.ndarray] = []
    self._used = 0

  def add(self, tokens: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = np.append(np.asarray(tokens, np.int32), self.eos)
    done = []
    for start in range(0, len(tokens), self.row_len - 1):
      chunk = np.concatenate([[self.bos], tokens[start:start + self.row_len - 1]]).astype(np.int32)
      if self._used + len(chunk) > self.row_len:
        done.append(self.flush())
      self._seg.append(np.full(len(chunk), len(self._tok) + 1, np.int32))
      self._tok.append(chunk)
      self._used += len(chunk)
    return done

  def flush(self) -> tuple[np.ndarray, np.ndarray]:
    """The current (partial) row, padded; resets the packer."""
    pad = self.row_len - self._used
    tok = np.concatenate(self._tok + [np.full(pad, self.pad, np.int32)])
    seg = np.concatenate(self._seg + [np.zeros(pad, np.int32)])
    self._tok, self._seg, self._used = [], [], 0
    return tok, seg

  @property
  def pending(self) -> bool:
    return self._used > 0


def pack_documents(docs: Iterable[np.ndarray], seq_len: int, *, bos_id: int, eos_id: int,
                   pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Packs token documents into ``(tokens, segment_ids)``, both (num_rows, seq_len + 1) int32."""
  packer = Packer(seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
  rows = [r for d in docs for r in packer.add(d)]
  if packer.pending:
    rows.append(packer.flush())
  if not rows:
    return np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len + 1), np.int32)
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def iter_packed(docs: Iterable[np.ndarray], seq_len: int, **ids) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Streaming version of :func:`pack_documents` (the final partial row is dropped)."""
  packer = Packer(seq_len, **ids)
  for d in docs:
    yield from packer.add(d)


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Position of every token inside its segment: restarts at 0 where the segment id changes."""
  idx = np.broadcast_to(np.arange(segment_ids.shape[-1]), segment_ids.shape)
  change = np.ones(segment_ids.shape, bool)
  change[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
  return (idx - np.maximum.accumulate(np.where(change, idx, 0), axis=-1)).astype(np.int32)


def rows_to_batch(tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray | None = None) -> Batch:
  """(batch, seq_len + 1) rows -> model batch: inputs, targets, segment_ids, positions (batch, seq_len) int32 and
  loss_mask (batch, seq_len) float32 (1 where the target is a real token of the input's document)."""
  seg_in, seg_out = segment_ids[:, :-1], segment_ids[:, 1:]
  mask = (seg_in == seg_out) & (seg_out > 0)
  if loss_mask is not None:
    mask &= loss_mask.astype(bool)
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "segment_ids": seg_in.astype(np.int32), "positions": segment_positions(seg_in),
          "loss_mask": mask.astype(np.float32)}
