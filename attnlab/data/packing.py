"""Packing documents into fixed-length rows, and rows into model batches.

Every document becomes ``[BOS] tokens [EOS]``; a document longer than a row is cut into chunks that each start
with BOS. Chunks are packed greedily, in order, into rows of ``seq_len + 1`` tokens (inputs = row[:-1],
targets = row[1:]); the rest of a row is PAD. ``segment_ids`` number the chunks of a row from 1 (0 = PAD), so
attention never crosses a document boundary and positions restart at every BOS.

``bos`` chooses where BOS goes (``DataConfig.bos``):

* ``"chunk"`` (default): every chunk starts with BOS, so every row starts with one on a fixed grid (Guo et al.
  2024's Bigram-Backcopy rows; the setting of most sink demos).
* ``"document"``: BOS only at the start of a document; a continuation chunk starts with the document's next
  token (LLaMA-style packing, as in the models StreamingLLM studies, Xiao et al. 2024, arXiv 2309.17453).
* ``"none"``: no BOS at all; documents end with EOS only (Gu et al. 2025, arXiv 2410.10781, §2 and §4: their
  LMs are trained on concatenated documents chunked to the context length, so the first token of a row is an
  arbitrary token, and ``Sink_1`` is measured on it).

:func:`concat_documents` + :func:`offset_rows` cut rows at random offsets of the concatenated stream instead of
on a grid (``DataConfig.row_offsets = "random"``; Gu et al. 2025 §5 re-sample the first token, and nanoGPT's
``get_batch`` draws rows at random offsets), so position 0 of a row is rarely a document start.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]
BOS_MODES = ("chunk", "document", "none")


class Packer:
  """Incremental greedy packer: ``add(doc_tokens)`` returns the rows completed by that document."""

  def __init__(self, seq_len: int, *, bos_id: int, eos_id: int, pad_id: int, bos: str = "chunk"):
    if seq_len < 2:
      raise ValueError(f"seq_len must be at least 2; got {seq_len}")
    if bos not in BOS_MODES:
      raise ValueError(f"bos must be one of {BOS_MODES}; got {bos!r}")
    self.row_len, self.bos, self.eos, self.pad, self.bos_mode = seq_len + 1, bos_id, eos_id, pad_id, bos
    self._tok: list[np.ndarray] = []
    self._seg: list[np.ndarray] = []
    self._used = 0

  def add(self, tokens: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens = np.append(np.asarray(tokens, np.int32), self.eos)
    done, start = [], 0
    while start < len(tokens):
      head = [self.bos] if self.bos_mode == "chunk" or (self.bos_mode == "document" and start == 0) else []
      take = self.row_len - len(head)
      chunk = np.concatenate([head, tokens[start:start + take]]).astype(np.int32)
      start += take
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
                   pad_id: int, bos: str = "chunk") -> tuple[np.ndarray, np.ndarray]:
  """Packs token documents into ``(tokens, segment_ids)``, both (num_rows, seq_len + 1) int32."""
  packer = Packer(seq_len, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, bos=bos)
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


def concat_documents(docs: Iterable[np.ndarray], *, bos_id: int, eos_id: int,
                     bos: str = "document") -> tuple[np.ndarray, np.ndarray]:
  """All documents as one stream ``[BOS] tokens EOS [BOS] tokens EOS ...`` (BOS per document unless
  ``bos="none"``) with segment ids 1, 2, ... per document: ``(tokens, segment_ids)``, both 1-D int32."""
  toks, segs = [], []
  for i, d in enumerate(docs):
    head = [] if bos == "none" else [bos_id]
    t = np.concatenate([head, np.asarray(d, np.int32), [eos_id]]).astype(np.int32)
    toks.append(t)
    segs.append(np.full(len(t), i % (2 ** 30) + 1, np.int32))
  if not toks:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(toks), np.concatenate(segs)


def offset_rows(tokens: np.ndarray, segment_ids: np.ndarray, seq_len: int,
                starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows ``stream[s : s + seq_len + 1]`` for every start ``s`` (see :func:`concat_documents`)."""
  idx = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]
  return tokens[idx], segment_ids[idx]


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
