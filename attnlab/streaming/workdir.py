"""The StreamingLLM table of a trained run (Xiao et al. 2024, Table 1-3), written into its workdir
(``attnlab stream``, :mod:`attnlab.app.stream`).

Streams ``num_streams`` held-out sequences of ``length`` tokens (BOS only at the start) through the run's model
under full attention (when ``length`` fits ``max_seq_len``), a window-only cache (0 + W) and a
sink + window cache (n_sink + W - n_sink) of equal size, W = the training length by default; writes
``DIR/streaming/streaming.{md,json,png}``. Needs softmax ``dot_product`` layers with RoPE/NoPE (see
:mod:`attnlab.streaming.eval`).
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from attnlab.data import sources, synthetic
from attnlab.data.tokenizer import make_tokenizer
from attnlab.streaming.cache import StreamingPolicy
from attnlab.streaming.eval import streaming_perplexity, write_streaming_report


def heldout_streams(data_cfg, *, length: int, num_streams: int) -> np.ndarray:
  """(num_streams, length) held-out token streams starting with BOS."""
  tok = make_tokenizer(data_cfg.tokenizer)
  if data_cfg.source == "synthetic":
    fn = synthetic.task_generator(data_cfg.task)
    rows = [fn(data_cfg.task, np.random.default_rng([data_cfg.seed, 1, 1_000_000 + i]), length - 1, tok)[0]
            for i in range(num_streams)]
    return np.stack(rows).astype(np.int32)
  if data_cfg.source == "hub" or data_cfg.streaming:
    raise ValueError("attnlab stream reads finite held-out text (embedded or local files), not a hub stream")
  docs = sources.finite_documents(data_cfg.source, "validation", paths=data_cfg.paths,
                                  eval_paths=data_cfg.eval_paths, text_field=data_cfg.text_field,
                                  heldout_every=data_cfg.heldout_every,
                                  text_documents=data_cfg.text_documents, doc_chars=data_cfg.doc_chars)
  text = tok.encode("\n\n".join(docs))
  need = num_streams * (length - 1)
  if len(text) < need:
    raise ValueError(f"the held-out text has {len(text)} tokens; {num_streams} streams of {length} need {need}")
  body = text[:need].reshape(num_streams, length - 1)
  return np.concatenate([np.full((num_streams, 1), tok.bos_id), body], 1).astype(np.int32)


def write_run_streaming_report(exp_cfg, workdir: str, eval_graphdef, state, *, length: int = 512,
                               num_streams: int = 4, window: int | None = None, n_sink: int = 4) -> str:
  """Writes the streaming report of the train ``state`` into ``workdir/streaming``; returns the Markdown table."""
  window = window or exp_cfg.data.seq_len
  if not 0 < n_sink < window:
    raise ValueError(f"need 0 < n_sink ({n_sink}) < window ({window})")
  model = nnx.merge(eval_graphdef, state["params"], state["rest"])
  tokens = heldout_streams(exp_cfg.data, length=length, num_streams=num_streams)
  policies = {"window": StreamingPolicy(0, window), "sink+window": StreamingPolicy(n_sink, window - n_sink)}
  results = streaming_perplexity(model, tokens, policies)
  return write_streaming_report(results, os.path.join(workdir, "streaming"))
