"""The sink report of a trained model: ``sinks.json`` with every metric and PNG plots.

``write_sink_report(model, tokens, out_dir, history=None)`` writes
  * ``sinks.json``: per-layer/per-head metrics (raw AND Gu-proxy sink rates, importance, first-token attention,
    row mass, learned-sink mass, value/key norm ratios, cos(q, k_1)), per-residual-state massive activations, and
    the model-level summary (Sink_k^eps in %);
  * ``sink_rate.png``: layer x head heatmaps of the raw and proxy sink rates and the raw row mass (a head with a
    high proxy rate but a tiny row mass has switched itself off: it is not a sink);
  * ``attention_maps.png``: the attention maps of the heads with the largest importance, for one sample;
  * ``norm_ratio.png``: first-token hidden-norm ratio per residual state and value-norm ratio per layer;
  * ``history.png`` (with ``history``): the summary metrics vs training step, from ``metrics.jsonl`` records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.analysis.metrics import SUMMARY_KEYS, model_metrics

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


def _plot_heatmaps(metrics, path):
  import matplotlib.pyplot as plt
  panels = (("sink_rate_raw", "Sink rate, raw weights (%)", 0, 100),
            ("sink_rate_proxy", "Sink rate, Gu proxy (%)", 0, 100),
            ("row_mass", "raw row mass", 0, None))
  fig, axes = plt.subplots(1, 3, figsize=(12, 1.2 + 0.5 * len(metrics["layers"])), squeeze=False)
  for ax, (key, title, lo, hi) in zip(axes[0], panels):
    width = max((len(layer[key]) for layer in metrics["layers"] if key in layer), default=1)
    data = np.stack([np.asarray(layer[key], float) if key in layer else np.full(width, np.nan)
                     for layer in metrics["layers"]])
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
    ax.set(title=title, xlabel="head", ylabel="layer")
    for (i, j), val in np.ndenumerate(data):
      if np.isfinite(val):
        ax.text(j, i, f"{val:.2g}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_maps(internals, metrics, path, *, sample, num_heads) -> bool:
  import matplotlib.pyplot as plt
  ranked = sorted(((float(layer["alpha_raw"][h]), l, h) for l, layer in enumerate(metrics["layers"])
                   for h in range(len(layer.get("alpha_raw", ())))), reverse=True)[:num_heads]
  if not ranked:
    return False
  fig, axes = plt.subplots(1, len(ranked), figsize=(3.2 * len(ranked), 3), squeeze=False)
  for ax, (alpha, l, h) in zip(axes[0], ranked):
    w = np.asarray(internals["layers"][l]["weights"][sample, h])
    ax.imshow(w, cmap="magma", vmin=0)
    ax.set(title=f"layer {l} head {h}\nalpha_k raw {alpha:.2f}", xlabel="key", ylabel="query")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _plot_norms(metrics, path):
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ratios = [h["norm_ratio"] for h in metrics["hidden"]]
  ax.plot(range(len(ratios)), ratios, "o-", label="||h_k|| / mean ||h_t|| (0 = embeddings)")
  vr = [(l + 1, float(np.mean(layer["value_norm_ratio"]))) for l, layer in enumerate(metrics["layers"])
        if "value_norm_ratio" in layer]
  if vr:
    ax.plot(*zip(*vr), "s--", label="||v_k|| / mean ||v_t|| (layer l)")
  ax.axhline(1.0, color="gray", lw=0.5)
  ax.set(xlabel="residual state / layer", ylabel="first-token norm ratio")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _plot_history(records, path) -> bool:
  import matplotlib.pyplot as plt
  keys = [k for k in SUMMARY_KEYS + ("massive_ratio",) if any(HISTORY_PREFIX + k in r for r in records)]
  if not keys:
    return False
  rate_keys = [k for k in keys if k.startswith("sink_rate")]
  other = [k for k in keys if not k.startswith("sink_rate")]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
  for ax, group, ylabel in ((axes[0], rate_keys, "Sink_1 (%)"), (axes[1], other, "value")):
    for key in group:
      pts = [(r["step"], r[HISTORY_PREFIX + key]) for r in records if HISTORY_PREFIX + key in r and "step" in r]
      if pts:
        ax.plot(*zip(*pts), label=key)
    ax.set(xlabel="training step", ylabel=ylabel)
    if group:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def write_sink_report(model, tokens, out_dir: str, history: str | Iterable[Mapping[str, Any]] | None = None, *,
                      k: int = 1, eps: float = 0.3, query_mask=None, sample: int = 0,
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
  files = ["sinks.json", "sink_rate.png", "norm_ratio.png"]
  _plot_heatmaps(metrics, os.path.join(out_dir, "sink_rate.png"))
  _plot_norms(metrics, os.path.join(out_dir, "norm_ratio.png"))
  if _plot_maps(internals, metrics, os.path.join(out_dir, "attention_maps.png"), sample=sample, num_heads=num_maps):
    files.append("attention_maps.png")
  if history is not None and _plot_history(load_history(history), os.path.join(out_dir, "history.png")):
    files.append("history.png")
  report["files"] = files
  with open(os.path.join(out_dir, "sinks.json"), "w") as f:
    json.dump(_jsonable(report), f, indent=1)
  return report
