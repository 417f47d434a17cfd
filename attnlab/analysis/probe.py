"""The probe batch of a run (held-out sequences from its data config) and the sink scalars logged in training.

Probe sequences are complete held-out rows of one document/example, cut to ``T = min(AnalysisConfig.seq_len,
DataConfig.seq_len)`` tokens: with BOS (``<s> x_1 .. x_{T-1}``, what the model was trained on) or without it
(``x_1 .. x_T``, Gu et al.'s setting for models trained without BOS). A synthetic task may define
``probe_query_mask(inputs)`` to restrict first-token attention to some queries (Bigram-Backcopy: the non-trigger
positions, Guo et al.'s ``Attn_<s>``).
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
from attnlab.data.pipeline import make_dataset
from attnlab.data.tokenizer import make_tokenizer


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
  tokens = (full[:, :seq] if bos else full[:, 1:]).astype(np.int32)
  mask_fn = getattr(data_cfg.task, "probe_query_mask", None)
  return Probe(tokens, None if mask_fn is None else np.asarray(mask_fn(tokens), bool), bos)


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
