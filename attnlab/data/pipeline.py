"""The input pipeline: ``DataConfig`` -> a deterministic, checkpointable, per-process batch iterator.

Three iterators share one interface (``next(it)`` -> batch dict, ``it.get_state()`` / ``it.set_state(state)``):

* ``ArrayIterator`` (finite text sources, materialised and packed once): batch ``s`` is a pure function of
  (seed, s): global rows ``[s·G, (s+1)·G)`` with ``G = batch_size · process_count`` index an epoch-wise
  permutation, and process ``p`` takes rows ``[p·B, (p+1)·B)`` of them, so processes read disjoint rows.
* ``SyntheticIterator``: row ``r`` is generated from ``np.random.default_rng([seed, split, r])``, same layout.
* ``StreamIterator`` (hub or ``streaming=True``): documents streamed, shuffled in a buffer and sharded by
  ``datasets``; resuming replays the stream up to the saved position (deterministic, costs a re-read).

The state is ``{"step": batches produced}``, saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from attnlab.data import sources, synthetic
from attnlab.data.packing import (BOS_MODES, Batch, concat_documents, iter_packed, offset_rows, pack_documents,
                                  rows_to_batch)
from attnlab.data.special_tokens import LandmarkTokens, MetaTokens, interleave
from attnlab.data.tokenizer import make_tokenizer
from attnlab import fields

SOURCES = ("embedded", "text", "json", "parquet", "files", "hub", "synthetic")
ROW_OFFSETS = ("grid", "random")
_SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to batch it. ``batch_size`` is per process; ``seq_len`` is the model input length."""

  source: str = "embedded"  # see SOURCES; "files" infers text/json/parquet from the extension
  paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()  # held-out files; empty -> every `heldout_every`-th document is held out
  hub_name: str | None = None  # e.g. "roneneldan/TinyStories" (source="hub")
  hub_config: str | None = None
  hub_split: str = "train"
  hub_eval_split: str | None = None  # None -> hold out every `heldout_every`-th streamed document
  text_field: str = "text"
  tokenizer: str = "byte"  # "byte" or a path to a tokenizer.json
  task: Any = None  # synthetic task config (PasskeyConfig, MQARConfig, ...) for source="synthetic"
  seq_len: int = 128
  batch_size: int = 8
  seed: int = 0
  shuffle: bool = True
  streaming: bool = False  # stream local files instead of materialising them (always on for the hub)
  shuffle_buffer: int = 1000
  heldout_every: int = 16
  # False: attention spans the whole packed row (no segment ids, positions 0..seq_len-1; GPT-2 style), for
  # variants whose structure has no notion of packed documents (CCA's groups are aligned to the row start).
  document_mask: bool = True
  # Landmark / meta tokens interleaved into every batch (attnlab.data.special_tokens); ExperimentConfig fills it
  # in from the model's attention config, so it rarely needs binding.
  special_tokens: LandmarkTokens | MetaTokens | None = None
  # How a plain-text file becomes documents (attnlab.data.sources.hf_documents): "paragraph" (blank lines),
  # "line", "document" (whole file) or "size" (pieces of about `doc_chars` characters cut at line breaks).
  text_documents: str = "paragraph"
  doc_chars: int = 4096
  # The papers' data settings (attnlab.data.packing): where BOS goes ("chunk": every row starts with BOS, Guo et
  # al. 2024; "document": only at document starts, LLaMA-style packing as in StreamingLLM's models; "none": no
  # BOS, Gu et al. 2025 §4) and where rows start ("grid": packed rows; "random": training rows cut at random
  # offsets of the concatenated documents, so row position 0 is an arbitrary token, Gu et al. 2025 §2/§5).
  bos: str = "chunk"
  row_offsets: str = "grid"

  def __post_init__(self):
    object.__setattr__(self, "paths", fields.paths("DataConfig", "paths", self.paths))
    object.__setattr__(self, "eval_paths", fields.paths("DataConfig", "eval_paths", self.eval_paths))
    fields.integer("DataConfig", "seq_len", self.seq_len, minimum=2)
    for name in ("batch_size", "shuffle_buffer", "heldout_every"):
      fields.integer("DataConfig", name, getattr(self, name))
    fields.integer("DataConfig", "seed", self.seed, minimum=0)
    fields.string("DataConfig", "tokenizer", self.tokenizer)
    fields.string("DataConfig", "text_field", self.text_field)
    for name in ("shuffle", "streaming", "document_mask"):
      fields.boolean("DataConfig", name, getattr(self, name))
    if self.source not in SOURCES:
      raise ValueError(f"unknown data source {self.source!r}; choose one of {SOURCES}")
    if (self.source == "synthetic") != (self.task is not None):
      raise ValueError("source='synthetic' needs DataConfig.task (and a task needs source='synthetic')")
    if self.source == "hub" and not self.hub_name:
      raise ValueError("source='hub' needs DataConfig.hub_name")
    if self.seq_len < 2 or self.batch_size < 1:
      raise ValueError(f"seq_len must be >= 2 and batch_size >= 1; got {self.seq_len}, {self.batch_size}")
    if self.special_tokens is not None and not isinstance(self.special_tokens, (LandmarkTokens, MetaTokens)):
      raise ValueError(f"special_tokens must be LandmarkTokens, MetaTokens or None; got {self.special_tokens!r}")
    if self.text_documents not in sources.TEXT_DOCUMENTS:
      raise ValueError(f"text_documents must be one of {sources.TEXT_DOCUMENTS}; got {self.text_documents!r}")
    if self.bos not in BOS_MODES:
      raise ValueError(f"DataConfig.bos must be one of {BOS_MODES}; got {self.bos!r}")
    if self.row_offsets not in ROW_OFFSETS:
      raise ValueError(f"DataConfig.row_offsets must be one of {ROW_OFFSETS}; got {self.row_offsets!r}")
    if self.row_offsets == "random" and (self.source in ("hub", "synthetic") or self.streaming):
      raise ValueError("row_offsets='random' needs a finite text source (embedded or local files, not streamed)")


class ArrayIterator:
  """Random-access batches over packed rows (see the module docstring)."""

  def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray, *, batch_size: int, seed: int, shuffle: bool,
               process_index: int = 0, process_count: int = 1):
    if len(tokens) == 0:
      raise ValueError("the dataset produced no examples")
    self.tokens, self.segment_ids = tokens, segment_ids
    self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.step = 0
    self._perms: dict[int, np.ndarray] = {}

  @property
  def num_rows(self) -> int:
    return len(self.tokens)

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      n = self.num_rows
      self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                     else np.arange(n)} | {e: p for e, p in self._perms.items() if e == epoch - 1}
    return self._perms[epoch]

  def row_indices(self, step: int) -> np.ndarray:
    g = step * self.batch_size * self.process_count + self.process_index * self.batch_size
    idx = np.arange(g, g + self.batch_size)
    return np.array([self._perm(int(i) // self.num_rows)[int(i) % self.num_rows] for i in idx])

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rows = self.row_indices(self.step)
    self.step += 1
    return rows_to_batch(self.tokens[rows], self.segment_ids[rows])

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


class OffsetIterator:
  """Training rows at random offsets of one concatenated token stream (``DataConfig.row_offsets = "random"``):
  row ``j`` of batch ``s`` starts at an offset drawn from ``default_rng([seed, s, process, j])``."""

  def __init__(self, tokens: np.ndarray, segment_ids: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
               process_index: int = 0):
    if len(tokens) < seq_len + 2:
      raise ValueError(f"the data holds {len(tokens)} tokens; rows of {seq_len + 1} need more")
    self.tokens, self.segment_ids, self.seq_len = tokens, segment_ids, seq_len
    self.batch_size, self.seed, self.process_index = batch_size, seed, process_index
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([self.seed, self.step, self.process_index])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
    self.step += 1
    return rows_to_batch(*offset_rows(self.tokens, self.segment_ids, self.seq_len, starts))

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


class SyntheticIterator:
  """Batches of a registered synthetic task; row ``r`` depends only on (seed, split, r)."""

  def __init__(self, task, tokenizer, *, seq_len: int, batch_size: int, seed: int, split: str,
               process_index: int = 0, process_count: int = 1):
    self.task, self.tokenizer, self.fn = task, tokenizer, synthetic.task_generator(task)
    self.seq_len, self.batch_size, self.seed, self.split_id = seq_len, batch_size, seed, _SPLIT_IDS[split]
    self.process_index, self.process_count = process_index, process_count
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    g = self.step * self.batch_size * self.process_count + self.process_index * self.batch_size
    self.step += 1
    rows = [self.fn(self.task, np.random.default_rng([self.seed, self.split_id, r]), self.seq_len, self.tokenizer)
            for r in range(g, g + self.batch_size)]
    tokens = np.stack([t for t, _ in rows])
    seg = (tokens != self.tokenizer.pad_id).astype(np.int32)
    return rows_to_batch(tokens, seg, np.stack([m for _, m in rows]))

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


class StreamIterator:
  """Batches packed on the fly from a document stream; epochs restart the stream with seed + epoch."""

  def __init__(self, cfg: DataConfig, tokenizer, *, split: str, process_index: int = 0, process_count: int = 1):
    self.cfg, self.tokenizer, self.split = cfg, tokenizer, split
    self.process_index, self.process_count = process_index, process_count
    self.step = 0
    self._rows = self._row_stream()

  def _docs(self, epoch: int) -> Iterator[str]:
    cfg = self.cfg
    if cfg.source == "hub":
      name, files, config_name = cfg.hub_name, None, cfg.hub_config
      split = cfg.hub_eval_split if (self.split == "validation" and cfg.hub_eval_split) else cfg.hub_split
      held_out = cfg.hub_eval_split is None
    else:
      use_eval = self.split == "validation" and cfg.eval_paths
      files = cfg.eval_paths if use_eval else cfg.paths
      sources.check_files(files)
      name, config_name, split, held_out = sources.builder_for(cfg.source, files), None, "train", not use_eval
    seed = cfg.seed + epoch if (cfg.shuffle and self.split == "train") else None
    docs = sources.hf_documents(name, data_files=files, config_name=config_name, split=split,
                                text_field=cfg.text_field, process_index=self.process_index,
                                process_count=self.process_count, shuffle_seed=seed,
                                shuffle_buffer=cfg.shuffle_buffer, text_documents=cfg.text_documents,
                                doc_chars=cfg.doc_chars)
    for i, d in enumerate(docs):
      if d and (not held_out or (i % cfg.heldout_every == cfg.heldout_every // 2) == (self.split == "validation")):
        yield d

  def _row_stream(self):
    tok = self.tokenizer
    ids = dict(bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, bos=self.cfg.bos)
    epoch = 0
    while True:
      n = 0
      for row in iter_packed((tok.encode(d) for d in self._docs(epoch)), self.cfg.seq_len, **ids):
        n += 1
        yield row
      if n == 0:
        raise ValueError("the data stream produced no examples")
      epoch += 1

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rows = [next(self._rows) for _ in range(self.cfg.batch_size)]
    self.step += 1
    return rows_to_batch(np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    """Replays the stream from the start up to ``state["step"]``."""
    self._rows, self.step = self._row_stream(), 0
    for _ in range(int(state["step"])):
      next(self)


class WholeRowIterator:
  """Wraps a batch iterator so that attention is not masked at document boundaries: ``segment_ids`` becomes
  ``None`` and positions run over the whole row. Loss masks are unchanged (no target crosses a boundary)."""

  def __init__(self, inner):
    self.inner = inner

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    batch = dict(next(self.inner))
    batch["segment_ids"] = None
    batch["positions"] = np.broadcast_to(np.arange(batch["inputs"].shape[1], dtype=np.int32),
                                         batch["inputs"].shape).copy()
    return batch

  def get_state(self) -> dict:
    return self.inner.get_state()

  def set_state(self, state: dict) -> None:
    self.inner.set_state(state)


class SpecialTokenIterator:
  """Wraps a batch iterator, interleaving ``cfg.special_tokens`` (:func:`attnlab.data.special_tokens.interleave`)
  into every batch. The random layout of batch ``s`` depends only on (seed, split, process, s), so it resumes
  exactly with the inner iterator's state."""

  def __init__(self, inner, spec, *, seq_len: int, seed: int, split: str, pad_id: int, process_index: int = 0):
    self.inner, self.spec, self.seq_len, self.pad_id = inner, spec, seq_len, pad_id
    self._key = (seed, _SPLIT_IDS[split], process_index)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    rng = np.random.default_rng([*self._key, self.inner.get_state()["step"]])
    return interleave(next(self.inner), self.spec, seq_len=self.seq_len, rng=rng, pad_id=self.pad_id)

  def get_state(self) -> dict:
    return self.inner.get_state()

  def set_state(self, state: dict) -> None:
    self.inner.set_state(state)


def make_dataset(cfg: DataConfig, *, split: str = "train", seq_len: int | None = None, process_index: int = 0,
                 process_count: int = 1, tokenizer=None):
  """The batch iterator of ``cfg`` for ``split`` ("train" or "validation"); ``seq_len`` overrides the config's
  (length-extrapolation evaluation). Processes with distinct ``process_index`` read disjoint rows."""
  tokenizer = tokenizer or make_tokenizer(cfg.tokenizer)
  seq_len = seq_len or cfg.seq_len
  spec = cfg.special_tokens
  it = _make_iterator(cfg, split=split, seq_len=spec.source_len(seq_len) if spec else seq_len,
                      process_index=process_index, process_count=process_count, tokenizer=tokenizer)
  if spec is not None:
    it = SpecialTokenIterator(it, spec, seq_len=seq_len, seed=cfg.seed, split=split, pad_id=tokenizer.pad_id,
                              process_index=process_index)
  return it if cfg.document_mask else WholeRowIterator(it)


def _make_iterator(cfg: DataConfig, *, split, seq_len, process_index, process_count, tokenizer):
  if split not in _SPLIT_IDS:
    raise ValueError(f"split must be 'train' or 'validation'; got {split!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
  tokenizer = tokenizer or make_tokenizer(cfg.tokenizer)
  seq_len = seq_len or cfg.seq_len
  shard = dict(process_index=process_index, process_count=process_count)
  if cfg.source == "synthetic":
    return SyntheticIterator(cfg.task, tokenizer, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                             split=split, **shard)
  if cfg.source == "hub" or cfg.streaming:
    return StreamIterator(dataclasses.replace(cfg, seq_len=seq_len), tokenizer, split=split, **shard)
  source = "files" if cfg.source == "files" else cfg.source
  docs = sources.finite_documents(source, split, paths=cfg.paths, eval_paths=cfg.eval_paths,
                                  text_field=cfg.text_field, heldout_every=cfg.heldout_every,
                                  text_documents=cfg.text_documents, doc_chars=cfg.doc_chars)
  if cfg.row_offsets == "random" and split == "train":
    tokens, seg = concat_documents((tokenizer.encode(d) for d in docs), bos_id=tokenizer.bos_id,
                                   eos_id=tokenizer.eos_id, bos="none" if cfg.bos == "none" else "document")
    return OffsetIterator(tokens, seg, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                          process_index=process_index)
  tokens, seg = pack_documents((tokenizer.encode(d) for d in docs), seq_len, bos_id=tokenizer.bos_id,
                               eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, bos=cfg.bos)
  return ArrayIterator(tokens, seg, batch_size=cfg.batch_size, seed=cfg.seed,
                       shuffle=cfg.shuffle and split == "train", **shard)
