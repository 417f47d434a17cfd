"""The probe batch of a run (held-out sequences from its data config) and the sink scalars logged in training.

Probe sequences are complete held-out rows of one document/example, cut to ``T = min(AnalysisConfig.seq_len,
DataConfig.seq_len)`` tokens: with BOS (``<s> x_1 .. x_{T-1}``, what the model was trained on) or without it
(``x_1 .. x_T``, Gu et al.'s setting for models trained without BOS). A synthetic task may define
``probe_query_mask(inputs)`` to restrict first-token attention to some queries (Bigram-Backcopy: the non-trigger
positions, Guo et al.'s ``Attn_<s>``).

:func:`file_probe` builds the probe from your own text instead (``attnlab sinks --probe_file F``): a plain-text file
(documents by paragraph, or ``DataConfig.text_documents``), a JSONL/JSON/parquet file (``DataConfig.text_field``),
or a prompt file (``.prompts``/``.lst``: one prompt per line). Each document gives one sequence of its first
``T`` tokens (with BOS: ``<s>`` + the first ``T - 1``); shorter documents are skipped. A Bigram-Backcopy run
encodes the text with its chain's characters (characters outside the chain map to its "other" token).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from attnlab.analysis.config import AnalysisConfig
from attnlab.analysis.metrics import model_metrics
from attnlab.analysis.report import history_record
from attnlab.data import sources
from attnlab.data.pipeline import make_dataset
from attnlab.data.tokenizer import make_tokenizer

PROMPT_EXTS = (".prompts", ".lst")


@dataclasses.dataclass(frozen=True)
class Probe:
  tokens: np.ndarray  # (num_sequences, T) int32
  query_mask: np.ndarray | None  # (num_sequences, T) bool, or None = every query
  bos: bool


def probe_batch(data_cfg, cfg: AnalysisConfig, *, bos: bool = True, tokenizer=None,
                max_batches: int = 64) -> Probe:
  """``cfg.num_sequences`` held-out probe sequences of the run's data (fewer if the held-out split is smaller)."""
  tokenizer = tokenizer or make_tokenizer(data_cfg.tokenizer)
  seq = min(cfg.seq_len, data_cfg.seq_len)
  batch = max(cfg.num_sequences, 1)
  it = make_dataset(dataclasses.replace(data_cfg, batch_size=batch, document_mask=True), split="validation",
                    seq_len=seq, tokenizer=tokenizer)
  rows, seen = [], set()
  for _ in range(max_batches):
    b = next(it)
    full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)  # (batch, T + 1)
    whole = (b["segment_ids"] == b["segment_ids"][:, :1]).all(1) & (b["loss_mask"][:, -1] > 0)
    for row, ok in zip(full, whole):
      key = row.tobytes()
      if ok and key not in seen:  # a finite split cycles: stop at repeats
        seen.add(key)
        rows.append(row)
    if len(rows) >= cfg.num_sequences:
      break
  if not rows:
    raise ValueError("no complete held-out row to build the sink probe from (rows must hold one document)")
  full = np.stack(rows[:cfg.num_sequences])
  bos_id = _bos_id(data_cfg, tokenizer)
  if (full[:, 0] == bos_id).all():  # rows start with BOS (DataConfig.bos = "chunk"): drop it for no-BOS
    tokens = full[:, :seq] if bos else full[:, 1:]
  else:  # rows without BOS (DataConfig.bos = "none"/"document"): add it for the with-BOS probe
    tokens = np.concatenate([np.full((len(full), 1), bos_id), full[:, :seq - 1]], 1) if bos else full[:, :seq]
  return _with_mask(data_cfg, tokens.astype(np.int32), bos)


def _bos_id(data_cfg, tokenizer) -> int:
  chain = getattr(data_cfg.task, "chain", None)
  return chain.bos_id if chain is not None else tokenizer.bos_id


def _with_mask(data_cfg, tokens: np.ndarray, bos: bool) -> Probe:
  mask_fn = getattr(data_cfg.task, "probe_query_mask", None)
  return Probe(tokens, None if mask_fn is None else np.asarray(mask_fn(tokens), bool), bos)


def read_probe_documents(path: str, data_cfg) -> list[str]:
  """The documents of a probe file (see the module docstring)."""
  sources.check_files((path,))
  if path.lower().endswith(PROMPT_EXTS):
    with open(path, encoding="utf-8") as f:
      return [line.rstrip("\n") for line in f if line.strip()]
  return sources.local_documents("files", (path,), data_cfg.text_field, text_documents=data_cfg.text_documents,
                                 doc_chars=data_cfg.doc_chars)


def encode_text(data_cfg, text: str, tokenizer=None) -> np.ndarray:
  """``text`` in the run's vocabulary: the tokenizer's, or a Bigram-Backcopy chain's characters."""
  chain = getattr(data_cfg.task, "chain", None)
  if chain is not None:
    index = {c: i for i, c in enumerate(chain.chars)}
    return np.array([index.get(c, len(chain.chars) - 1) for c in text], np.int32)
  return np.asarray((tokenizer or make_tokenizer(data_cfg.tokenizer)).encode(text), np.int32)


def file_probe(path: str, data_cfg, cfg: AnalysisConfig, *, bos: bool = True, tokenizer=None) -> Probe:
  """Up to ``cfg.num_sequences`` probe sequences of ``T = min(cfg.seq_len, DataConfig.seq_len)`` tokens from
  the documents of ``path``."""
  tokenizer = tokenizer or make_tokenizer(data_cfg.tokenizer)
  seq = min(cfg.seq_len, data_cfg.seq_len)
  bos_id = _bos_id(data_cfg, tokenizer)
  rows = []
  for doc in read_probe_documents(path, data_cfg):
    ids = encode_text(data_cfg, doc, tokenizer)
    if len(ids) >= seq:
      rows.append(np.concatenate([[bos_id], ids[:seq - 1]]) if bos else ids[:seq])
    if len(rows) >= cfg.num_sequences:
      break
  if not rows:
    raise ValueError(f"probe file {path!r} has no document of at least {seq} tokens (AnalysisConfig.seq_len); "
                     "use longer documents or set DataConfig.text_documents")
  return _with_mask(data_cfg, np.stack(rows).astype(np.int32), bos)


@functools.lru_cache(maxsize=16)
def _internals_fn(graphdef):
  def run(params, rest, tokens):
    model = nnx.merge(graphdef, params, rest, copy=True)
    return model(tokens, return_internals=True)[1]
  return jax.jit(run)


def probe_scalars(eval_graphdef, params, rest, probe: Probe, cfg: AnalysisConfig) -> dict[str, float]:
  """The model-level sink metrics on ``probe`` as ``{"sinks/<key>": value}`` (what training logs)."""
  internals = _internals_fn(eval_graphdef)(params, rest, probe.tokens)
  mask = None if probe.query_mask is None else probe.query_mask
  return history_record(model_metrics(internals, k=cfg.k, eps=cfg.eps, query_mask=mask))
