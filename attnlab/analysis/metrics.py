"""Attention-sink metrics, computed from one forward pass with ``return_internals=True``.

Notation: ``A[t, j]`` is the weight query ``t`` gives key ``j`` (over real tokens; a learned sink slot or sink logit
is reported separately as ``sink_mass``), ``k`` is the 1-based key position as in the papers (``k = 1`` is the
first token).

* Importance (Gu et al. 2025, "When Attention Sink Emerges in Language Models", §3.2 and their
  ``eval_sink_open_source.py``):  ``alpha_k = 1/(T-k+1) * sum_{t>=k} A[t, k]``, the attention key ``k`` receives,
  averaged over the queries that can see it. A head is a sink head when ``alpha_k > eps`` and
  ``Sink_k^eps`` is the fraction of (sample, layer, head) triples that are, in percent (eps = 0.3, T = 64).
* Gu's proxy for unnormalised scores (sigmoid, ReLU, ...): ``|A[t, j]| / sum_j' |A[t, j']|`` (their eval code adds
  1e-8). The proxy calls a head that switched itself off (row mass ~ 0) a sink when its leftovers sit on token 1, so
  every metric here is reported on BOTH the raw weights and the proxy, with the raw row mass beside them.
* First-token attention (Guo et al. 2024, ``Attn_<s>``): mean ``A[t, k]`` over selected queries (e.g. non-trigger
  positions of Bigram-Backcopy).
* Massive activations (Sun et al. 2024; Gu et al. Fig. 7): ``||h_k|| / mean_{t != k} ||h_t||`` per layer, and the
  largest ``|h|`` entries. Value drain (Guo et al.): ``||v_k|| / mean_{t != k} ||v_t||`` per head; the same for keys;
  ``cos(q_t, k_k)`` (Gu et al. Fig. 2: the sink comes from alignment, not norms).

Long sequences: every head-level metric only needs the weight column of key ``k`` and the row mass, never the dense
map. :class:`Columns` holds exactly that; :func:`columns_from_weights` fills it from a dense map and
:func:`softmax_columns_from_lse` from a kernel's per-row log-sum-exp (see :func:`chunked_logsumexp`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PROXY_EPS = 1e-8  # Gu et al.'s eval code: weights / (weights.sum(-1) + 1e-8)


@dataclasses.dataclass(frozen=True)
class Columns:
  """What the head-level sink metrics need from one attention layer, each (batch, heads, q_len).

  ``column``: raw weight on key ``k``; ``row_mass``: sum of raw weights over real keys (<= 1 for softmax with a
  sink, unbounded for unnormalised scores); ``row_abs_mass``: sum of ``|weights|`` (the proxy's denominator);
  ``sink_mass``: weight on a learned sink slot / sink logit (0 without one).
  """

  column: jax.Array
  row_mass: jax.Array
  row_abs_mass: jax.Array
  sink_mass: jax.Array

  @property
  def proxy_column(self) -> jax.Array:
    """Gu et al.'s proxy ``|A[t, k]| / (sum_j |A[t, j]| + 1e-8)``."""
    return jnp.abs(self.column) / (self.row_abs_mass + PROXY_EPS)


def _check_k(k: int, kv_len: int) -> int:
  if not 1 <= k <= kv_len:
    raise ValueError(f"k is the 1-based key position and must be in [1, {kv_len}]; got {k}")
  return k - 1


def columns_from_weights(weights: jax.Array, k: int = 1, sink_mass: jax.Array | None = None) -> Columns:
  """Dense path: ``weights`` (batch, heads, q_len, kv_len) raw attention weights over real tokens."""
  if weights.ndim != 4:
    raise ValueError(f"weights must be (batch, heads, q_len, kv_len); got shape {tuple(weights.shape)}")
  j = _check_k(k, weights.shape[-1])
  w = weights.astype(jnp.float32)
  sink = jnp.zeros(w.shape[:-1], jnp.float32) if sink_mass is None else sink_mass.astype(jnp.float32)
  return Columns(w[..., j], w.sum(-1), jnp.abs(w).sum(-1), sink)


def chunked_logsumexp(q: jax.Array, k: jax.Array, *, scale: float | None = None, chunk: int = 512) -> jax.Array:
  """Causal softmax row log-sum-exp ``lse_t = log sum_{j<=t} exp(scale q_t.k_j)`` in O(q_len * chunk) memory.

  q: (batch, seq, heads, head_dim), k: (batch, seq, kv_heads, head_dim). Returns (batch, heads, seq), exactly what a
  flash kernel keeps per row, so :func:`softmax_columns_from_lse` can use either.
  """
  b, t, h, d = q.shape
  if k.shape[1] != t:
    raise ValueError(f"self-attention expected: q has {t} positions, k has {k.shape[1]}")
  if h % k.shape[2]:
    raise ValueError(f"num_heads ({h}) must be a multiple of num_kv_heads ({k.shape[2]})")
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  kk = jnp.repeat(k, h // k.shape[2], axis=2).astype(jnp.float32)
  pad = (-t) % chunk
  kk = jnp.pad(kk, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, h, d)
  qf = q.astype(jnp.float32) * scale
  qpos = jnp.arange(t)

  def body(lse, xs):
    kc, start = xs
    s = jnp.einsum("bqhd,bkhd->bhqk", qf, kc)
    visible = (start + jnp.arange(chunk))[None, :] <= qpos[:, None]
    s = jnp.where(visible, s, -jnp.inf)
    return jnp.logaddexp(lse, jax.nn.logsumexp(s, axis=-1)), None

  starts = jnp.arange(kk.shape[1]) * chunk
  lse, _ = jax.lax.scan(body, jnp.full((b, h, t), -jnp.inf), (jnp.moveaxis(kk, 1, 0), starts))
  return lse


def softmax_columns_from_lse(q: jax.Array, k: jax.Array, lse: jax.Array, key: int = 1, *,
                             scale: float | None = None, sink_logits: jax.Array | None = None) -> Columns:
  """Row-statistics path for (causal) softmax: ``A[t, k] = exp(scale q_t.k_k - lse_t)`` without a dense map.

  ``lse`` (batch, heads, seq) is the log-sum-exp over real keys (a kernel's residual or
  :func:`chunked_logsumexp`); with per-head ``sink_logits`` the denominator gains ``exp(sink_h)``.
  """
  j = _check_k(key, k.shape[1])
  d = q.shape[-1]
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  kj = jnp.repeat(k[:, j], q.shape[2] // k.shape[2], axis=1).astype(jnp.float32)  # (batch, heads, d)
  s = jnp.einsum("bqhd,bhd->bhq", q.astype(jnp.float32), kj) * scale
  total = lse if sink_logits is None else jnp.logaddexp(lse, sink_logits[None, :, None])
  column = jnp.where(jnp.arange(q.shape[1]) >= j, jnp.exp(s - total), 0.0)
  row_mass = jnp.exp(lse - total)
  return Columns(column, row_mass, row_mass, 1.0 - row_mass)


def importance(column: jax.Array, k: int = 1) -> jax.Array:
  """Gu et al.'s ``alpha_k`` (batch, heads): mean of ``A[t, k]`` over queries ``t >= k`` (1-based)."""
  j = _check_k(k, column.shape[-1])
  return column[..., j:].mean(-1)


def query_mean(x: jax.Array, query_mask: jax.Array | None, k: int = 1) -> jax.Array:
  """Mean over the queries after key ``k`` (``t > k``, 1-based) selected by ``query_mask`` (batch, q_len).

  x: (batch, heads, q_len) -> (heads,).
  """
  j = _check_k(k, x.shape[-1])
  sel = jnp.arange(x.shape[-1]) > j
  sel = jnp.broadcast_to(sel, (x.shape[0], x.shape[-1]))
  if query_mask is not None:
    sel = jnp.logical_and(sel, query_mask)
  sel = sel[:, None, :].astype(jnp.float32)
  return (x * sel).sum((0, 2)) / jnp.maximum(sel.sum((0, 2)), 1.0)


def norm_ratio(x: jax.Array, k: int = 1) -> jax.Array:
  """``||x_k|| / mean_{t != k} ||x_t||`` per sample, over the last axis; x is (batch, seq, ..., dim)."""
  j = _check_k(k, x.shape[1])
  n = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)  # (batch, seq, ...)
  others = (n.sum(1) - n[:, j]) / max(x.shape[1] - 1, 1)
  return n[:, j] / jnp.maximum(others, 1e-30)


def cosine_to_key(q: jax.Array, keys: jax.Array, k: int = 1) -> jax.Array:
  """``cos(q_t, k_k)`` (batch, heads, q_len) with GQA (query head h reads kv head h // group)."""
  j = _check_k(k, keys.shape[1])
  kj = jnp.repeat(keys[:, j], q.shape[2] // keys.shape[2], axis=1).astype(jnp.float32)
  qf = q.astype(jnp.float32)
  dots = jnp.einsum("bqhd,bhd->bhq", qf, kj)
  return dots / jnp.maximum(jnp.linalg.norm(qf, axis=-1).transpose(0, 2, 1) * jnp.linalg.norm(kj, axis=-1)[..., None],
                            1e-30)


def layer_metrics(columns: Columns, *, k: int = 1, eps: float = 0.3, query_mask: jax.Array | None = None,
                  queries: jax.Array | None = None, keys: jax.Array | None = None,
                  values: jax.Array | None = None) -> dict[str, np.ndarray]:
  """Per-head metrics of one attention layer (arrays of shape (heads,)); see the module docstring.

  ``sink_rate_*`` is the percentage of samples in which the head's ``alpha_k > eps`` (averaging it over heads and
  layers gives ``Sink_k^eps``); ``first_token_attn_*``, ``row_mass``, ``sink_mass`` and ``cos_q_key`` average over
  the queries after key k selected by ``query_mask`` (default: all of them).
  """
  alpha_raw = importance(columns.column, k)
  alpha_proxy = importance(columns.proxy_column, k)
  out = {
      "alpha_raw": alpha_raw.mean(0),
      "alpha_proxy": alpha_proxy.mean(0),
      "sink_rate_raw": 100.0 * (alpha_raw > eps).mean(0),
      "sink_rate_proxy": 100.0 * (alpha_proxy > eps).mean(0),
      "first_token_attn_raw": query_mean(columns.column, query_mask, k),
      "first_token_attn_proxy": query_mean(columns.proxy_column, query_mask, k),
      "row_mass": query_mean(columns.row_mass, query_mask, k),
      "sink_mass": query_mean(columns.sink_mass, query_mask, k),
  }
  if values is not None:
    group = columns.column.shape[1] // values.shape[2]
    out["value_norm_ratio"] = jnp.repeat(norm_ratio(values, k).mean(0), group)
  if keys is not None:
    group = columns.column.shape[1] // keys.shape[2]
    out["key_norm_ratio"] = jnp.repeat(norm_ratio(keys, k).mean(0), group)
  if queries is not None and keys is not None:
    out["cos_q_key"] = query_mean(cosine_to_key(queries, keys, k), query_mask, k)
  return {name: np.asarray(v, np.float64) for name, v in out.items()}


MASSIVE_ABS, MASSIVE_FACTOR = 100.0, 1000.0  # Sun et al. 2024 §2: |h| > 100 and ~1000x the median magnitude


def activation_metrics(hidden: jax.Array, *, k: int = 1, top: int = 5) -> dict[str, Any]:
  """Massive activations of one residual state (batch, seq, d_model): first-token norm ratio and top |h| entries.

  Sun et al. 2024 ("Massive Activations in Large Language Models", arXiv 2402.17762) compare the largest
  magnitudes of a layer's hidden states with the median magnitude (their Fig. 1/2) and call an activation massive
  when ``|h| > 100`` and about 1000x the median: ``top_to_median`` is that ratio for the top entry, ``massive``
  their criterion; ``top_position``/``top_channel`` say where the top entries sit (position in the sequence,
  hidden dimension).
  """
  mag = jnp.abs(hidden.astype(jnp.float32))
  flat = mag.reshape(-1)
  top = min(top, flat.shape[0])
  vals, idx = jax.lax.top_k(flat, top)
  _, seq, dim = hidden.shape
  idx = np.asarray(idx)
  return {
      "norm_ratio": float(norm_ratio(hidden, k).mean()),
      "top_abs": np.asarray(vals, np.float64),
      "top_position": (idx // dim) % seq,
      "top_channel": idx % dim,
      "median_abs": float(jnp.median(mag)),
      # per sequence: its top-3 |h| and median |h|, averaged over the probe sequences (Sun et al. Fig. 2's lines)
      "top3_abs_per_seq": np.asarray(jax.lax.top_k(mag.reshape(mag.shape[0], -1), min(3, seq * dim))[0].mean(0),
                                     np.float64),
      "median_abs_per_seq": float(jnp.median(mag.reshape(mag.shape[0], -1), axis=1).mean()),
      "top_to_median": float(vals[0] / jnp.maximum(jnp.median(mag), 1e-12)),
      "massive": bool((vals[0] > MASSIVE_ABS) & (vals[0] >= MASSIVE_FACTOR * jnp.median(mag))),
  }


def model_metrics(internals: Mapping[str, Any], *, k: int = 1, eps: float = 0.3,
                  query_mask: jax.Array | None = None, top: int = 5) -> dict[str, Any]:
  """Every sink metric of one forward pass. ``internals`` is ``aux`` of ``model(tokens, return_internals=True)``.

  Returns ``{"layers": [per-head dict per layer], "hidden": [per-residual-state dict], "summary": {...}}`` where
  the summary holds the model-level scalars (:func:`summarize`). A layer whose internals have no dense
  ``weights`` (e.g. a linear-attention variant) gets an empty dict and is left out of the summary.
  """
  layers = []
  for aux in internals["layers"]:
    if "weights" not in aux:  # e.g. linear attention: no dense map; left empty (see softmax_columns_from_lse)
      layers.append({})
      continue
    cols = columns_from_weights(aux["weights"], k, aux.get("sink_mass"))
    layers.append(layer_metrics(cols, k=k, eps=eps, query_mask=query_mask, queries=aux.get("queries"),
                                keys=aux.get("keys"), values=aux.get("values")))
  hidden = [activation_metrics(h, k=k, top=top) for h in internals.get("hidden", ())]
  return {"k": k, "eps": eps, "layers": layers, "hidden": hidden, "summary": summarize(layers, hidden)}


SUMMARY_KEYS = ("sink_rate_proxy", "sink_rate_raw", "first_token_attn_proxy", "first_token_attn_raw", "row_mass",
                "sink_mass", "value_norm_ratio")


def summarize(layers: Sequence[Mapping[str, np.ndarray]],
              hidden: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
  """Model-level scalars: each per-head metric averaged over heads and layers (``sink_rate_*`` is then Gu's
  ``Sink_k^eps`` in %), plus the largest first-token hidden-norm ratio over layers (``massive_ratio``).
  These are the keys a training loop logs every N steps and the history plots read."""
  out = {}
  for key in SUMMARY_KEYS:
    vals = [np.mean(layer[key]) for layer in layers if key in layer]
    if vals:
      out[key] = float(np.mean(vals))
  if len(hidden) > 1:  # hidden[0] is the embedding output; the blocks' outputs follow
    out["massive_ratio"] = float(max(h["norm_ratio"] for h in hidden[1:]))
    out["top_to_median"] = float(max(h["top_to_median"] for h in hidden[1:]))
  return out
