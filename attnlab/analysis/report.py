"""The sink report of a trained model: ``sinks.json`` with every metric and PNG plots.

``write_sink_report(model, tokens, out_dir, history=None)`` writes
  * ``sinks.json``: per-layer/per-head metrics (raw AND Gu-proxy sink rates, importance, first-token attention,
    row mass, learned-sink mass, value/key norm ratios, cos(q, k_1)), per-residual-state massive activations, and
    the model-level summary (Sink_k^eps in %);
  * ``sink_rate.png``: layer x head heatmaps of the raw and proxy sink rates, the raw first-token weight and the raw
    row mass (a head with a high proxy rate but a tiny row mass has switched itself off: it is not a sink);
  * ``attention_maps.png``: the attention maps of the heads with the largest raw importance, on several probe
    sequences, with a learned sink slot as its own column;
  * ``norm_ratio.png``: first-token norm ratios of the residual stream, values and keys;
  * ``massive_activations.png``: Sun et al. 2024's top-|h| vs median per residual state;
  * ``history.png`` (with ``history``): the summary metrics vs training step, from ``metrics.jsonl`` records.
All figures: :mod:`attnlab.analysis.figures`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.analysis import figures
from attnlab.analysis.metrics import model_metrics

HISTORY_PREFIX = "sinks/"  # a training loop logs ``sinks/<summary key>`` (e.g. sinks/sink_rate_proxy) per step


def history_record(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The scalars a training loop logs every N steps: ``{"sinks/<key>": value}`` from :func:`model_metrics`."""
  return {HISTORY_PREFIX + key: value for key, value in metrics["summary"].items()}


def _jsonable(x):
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jnp.ndarray)):
    return np.asarray(x).tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def _layer_descriptions(model) -> list[dict[str, Any]]:
  out = []
  for block in model.blocks:
    cfg = getattr(block.attn, "cfg", None)
    if cfg is None:
      out.append({"kind": type(block.attn).__name__})
      continue
    out.append({"kind": type(block.attn).__name__, "score": cfg.score, "score_params": dict(cfg.score_params),
                "sink_logit": cfg.sink_logit, "sink_token": cfg.sink_token, "key_bias": cfg.key_bias,
                "value_bias": cfg.value_bias, "gate": cfg.gate, "num_heads": cfg.num_heads})
  return out


def load_history(history: str | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Records from a ``metrics.jsonl`` path (one JSON object per line) or an iterable of dicts."""
  if isinstance(history, (str, os.PathLike)):
    with open(history) as f:
      return [json.loads(line) for line in f if line.strip()]
  return [dict(r) for r in history]


@nnx.jit
def _internals(model, tokens):
  return model(tokens, return_internals=True)


def write_sink_report(model, tokens, out_dir: str, history: str | Iterable[Mapping[str, Any]] | None = None, *,
                      k: int = 1, eps: float = 0.3, query_mask=None, num_sequences: int = 3,
                      num_maps: int = 4, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Runs ``model`` on ``tokens`` (batch, seq) with internals and writes ``sinks.json`` + PNG plots to ``out_dir``.

  Args:
    model: a :class:`attnlab.DecoderLM` whose layers return dense ``weights`` with ``return_internals``.
    tokens: the probe batch, e.g. 100 held-out sequences of 64 tokens (Gu et al.), starting with BOS or not.
    history: ``metrics.jsonl`` path or records with ``step`` and ``sinks/<key>`` scalars (:func:`history_record`).
    k, eps: the key position (1-based) and threshold of ``Sink_k^eps``.
    query_mask: optional (batch, seq) bool; restricts first-token attention/row mass to these queries.
    extra: more top-level entries for ``sinks.json`` (e.g. the training step).
  Returns the metrics dict that was written (with numpy arrays).
  """
  import matplotlib
  matplotlib.use("Agg")

  tokens = jnp.asarray(tokens, jnp.int32)
  _, internals = _internals(model, tokens)
  metrics = model_metrics(internals, k=k, eps=eps, query_mask=query_mask)
  os.makedirs(out_dir, exist_ok=True)
  report = {"probe": {"batch": int(tokens.shape[0]), "seq": int(tokens.shape[1])},
            "attention": _layer_descriptions(model), **metrics, **(extra or {})}
  seq = int(tokens.shape[1])
  files = ["sinks.json", "sink_rate.png", "norm_ratio.png"]
  figures.plot_head_grid(metrics, os.path.join(out_dir, "sink_rate.png"), k=k, eps=eps)
  figures.plot_norms(metrics, os.path.join(out_dir, "norm_ratio.png"), k=k)
  if figures.plot_massive(metrics, os.path.join(out_dir, "massive_activations.png")):
    files.append("massive_activations.png")
  layers = internals["layers"]
  learned = [any(d.get(f) for f in ("sink_logit", "sink_token", "key_bias")) for d in report["attention"]]
  if figures.plot_attention_maps([a.get("weights") for a in layers], [a.get("sink_mass") for a in layers], metrics,
                                 os.path.join(out_dir, "attention_maps.png"), num_sequences=num_sequences,
                                 num_heads=num_maps, k=k, learned_sink=learned):
    files.append("attention_maps.png")
  if history is not None and figures.plot_curves(
      load_history(history), os.path.join(out_dir, "history.png"), seq_len=seq,
      title=f"sink metrics during training (metrics.jsonl, probe {tokens.shape[0]} x {seq} tokens)"):
    files.append("history.png")
  report["selected_heads"] = {"rule": f"largest raw alpha_{k} (mean weight on token {k}), first "
                              f"{min(num_sequences, int(tokens.shape[0]))} probe sequences",
                              "heads": [[l, h] for _, l, h in figures.select_heads(metrics, num_maps)]}
  report["uniform_first_token_weight"] = figures.uniform_first_token_weight(seq, k)
  report["files"] = files
  with open(os.path.join(out_dir, "sinks.json"), "w") as f:
    json.dump(_jsonable(report), f, indent=1)
  return report
