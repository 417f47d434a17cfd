"""Streaming evaluation of a trained :class:`attnlab.DecoderLM` under a StreamingLLM cache policy.

Tokens are fed one at a time through the model's own decode path (``DecoderLM.init_cache`` / ``step``, the cache
protocol of :mod:`attnlab.attention.cache`) under a :class:`StreamingPolicy`: a sink + window ring cache whose
keys are re-rotated at each step (``pos_shift``) or keep their positions. The perplexity of a long stream is
compared across full attention (one ordinary forward, where the sequence fits the model), window-only and
sink + window caches (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks", arXiv
2309.17453, Table 1-3). Supports softmax layers with any sink control (sink logit, sink token, key/value bias,
output gate); other score functions are refused: the study compares softmax caches.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.streaming.cache import StreamingPolicy


def _check_model(model) -> None:
  if getattr(model, "pos_embed", None) is not None:
    raise ValueError("streaming needs positions inside attention (RoPE/NoPE); this model adds learned absolute "
                     "position embeddings to its inputs, which a cache cannot re-position")
  for i, block in enumerate(model.blocks):
    score = getattr(block.attn.cfg, "score", None)
    if score is not None and score != "softmax":
      raise ValueError(f"streaming supports the softmax score (with any sink control); layer {i} uses "
                       f"{score!r}")


@nnx.jit(static_argnums=(2,))
def stream_logits(model, tokens: jax.Array, policy: StreamingPolicy) -> jax.Array:
  """Logits (batch, seq, vocab) of ``tokens`` (batch, seq) fed one at a time through the cached model: a thin
  wrapper over ``model.init_cache(..., policy=policy)`` and a ``lax.scan`` of ``model.step``."""
  _check_model(model)
  b, t = tokens.shape
  cache = model.init_cache(b, t, policy=policy)

  def step(cache, inp):
    token, pos = inp
    logits, cache = model.step(token, position=pos, cache=cache)
    return cache, logits

  _, logits = jax.lax.scan(step, cache, (tokens.T, jnp.arange(t)))
  return jnp.moveaxis(logits, 0, 1)


@nnx.jit
def _full_logits(model, tokens):
  return model(tokens)


def token_nll(logits: jax.Array, tokens: jax.Array) -> np.ndarray:
  """Next-token negative log-likelihood (batch, seq - 1) of ``tokens`` under ``logits`` (batch, seq, vocab)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -np.asarray(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0], np.float64)


def streaming_perplexity(model, tokens, policies: Mapping[str, StreamingPolicy] | None = None, *,
                         full: bool = True) -> dict[str, dict]:
  """Perplexity of a long stream ``tokens`` (batch, seq) under each cache policy, and under full attention.

  Default policies: ``window`` (0 + W) and ``sink+window`` (4 + W - 4) with ``W = max_seq_len // 4`` (the paper
  compares caches of equal size). Full attention runs as one forward when the sequence fits ``max_seq_len`` and is
  reported as ``None`` otherwise. Returns ``{name: {"ppl", "nll_by_position" (mean over batch), "policy"}}``.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  if tokens.ndim != 2 or tokens.shape[1] < 2:
    raise ValueError(f"tokens must be (batch, seq >= 2); got shape {tuple(tokens.shape)}")
  _check_model(model)
  if policies is None:
    w = max(model.cfg.max_seq_len // 4, 8)
    policies = {"window": StreamingPolicy(0, w), "sink+window": StreamingPolicy(4, w - 4)}
  results: dict[str, dict] = {}
  if full:
    if tokens.shape[1] <= model.cfg.max_seq_len:
      nll = token_nll(_full_logits(model, tokens), tokens)
      results["full"] = {"ppl": float(math.exp(nll.mean())), "nll_by_position": nll.mean(0).tolist(),
                         "policy": None}
    else:
      results["full"] = {"ppl": None, "nll_by_position": None,
                         "policy": f"does not fit: seq {tokens.shape[1]} > max_seq_len {model.cfg.max_seq_len}"}
  for name, policy in policies.items():
    nll = token_nll(stream_logits(model, tokens, policy), tokens)
    results[name] = {"ppl": float(math.exp(nll.mean())), "nll_by_position": nll.mean(0).tolist(),
                     "policy": policy.name}
  return results


def write_streaming_report(results: Mapping[str, dict], out_dir: str, *, smooth: int = 32) -> str:
  """Writes ``streaming.json``, ``streaming.md`` (table) and ``streaming.png`` (NLL vs position); returns the table."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "streaming.json"), "w") as f:
    json.dump(results, f, indent=1)
  rows = ["| cache | policy | perplexity |", "|---|---|---|"]
  for name, r in results.items():
    ppl = "n/a" if r["ppl"] is None else f"{r['ppl']:.3f}"
    rows.append(f"| {name} | {r['policy'] or 'full attention'} | {ppl} |")
  table = "\n".join(rows) + "\n"
  with open(os.path.join(out_dir, "streaming.md"), "w") as f:
    f.write(table)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  for name, r in results.items():
    if r["nll_by_position"] is None:
      continue
    nll = np.asarray(r["nll_by_position"])
    width = max(1, min(smooth, len(nll)))
    ax.plot(np.arange(width, len(nll) + 1), np.convolve(nll, np.ones(width) / width, mode="valid"), label=name)
  ax.set_xlabel("position in stream")
  ax.set_ylabel(f"NLL (running mean over {smooth})")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "streaming.png"), dpi=100)
  plt.close(fig)
  return table
