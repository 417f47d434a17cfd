"""The sink report's figures, drawn to be printed: one quantity per axis with its unit, fixed colour ranges
(attention weights 0-1, row mass 0-2, rates 0-100 %), integer layer/head ticks, a uniform-attention reference line
wherever a first-token weight is plotted, and legends outside the data.

* :func:`plot_head_grid`: layer x head heatmaps (raw and proxy ``Sink_k^eps``, raw first-token weight, raw row mass).
* :func:`plot_attention_maps`: several probe sequences x the heads with the largest raw importance ``alpha_k``
  (the stated rule); a learned sink slot / sink logit is drawn as its own column left of key 1.
* :func:`plot_norms`: first-token norm ratios of the residual stream, values and keys (Gu et al. 2025 Fig. 7;
  Guo et al. 2024's value drain).
* :func:`plot_massive`: Sun et al. 2024's massive activations: top-1/2/3 ``|h|`` per layer against the median.
* :func:`plot_curves`: the summary metrics against the training step (from ``metrics.jsonl`` or from the kept
  checkpoints: Gu et al. 2025 Fig. 4-style emergence curve).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

WEIGHT_CMAP, RATE_CMAP, MASS_CMAP = "magma", "viridis", "cividis"
ROW_MASS_MAX = 2.0  # colour range of the raw row mass (1 = normalised attention; above 2 saturates, marked ">")
DPI = 150


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=DPI, bbox_inches="tight")
  _plt().close(fig)
  return path


def uniform_first_token_weight(seq_len: int, k: int = 1) -> float:
  """The weight on key ``k`` of uniform causal attention, averaged over the queries that see it:
  ``mean_{t >= k} 1/t`` (1-based) — the reference a sink is measured against."""
  t = np.arange(k, seq_len + 1, dtype=np.float64)
  return float(np.mean(1.0 / t))


def _legend_outside(ax, **kw):
  handles, labels = ax.get_legend_handles_labels()
  if handles:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False, **kw)


def _int_ticks(ax, n_x: int, n_y: int):
  ax.set_xticks(range(n_x))
  ax.set_yticks(range(n_y))


def _grid(metrics: Mapping, key: str) -> np.ndarray:
  layers = metrics["layers"]
  width = max((len(layer[key]) for layer in layers if key in layer), default=1)
  return np.stack([np.asarray(layer[key], float) if key in layer else np.full(width, np.nan) for layer in layers])


def plot_head_grid(metrics: Mapping, path: str, *, k: int = 1, eps: float = 0.3) -> str:
  """Layer x head heatmaps with fixed colour ranges and the value in every cell."""
  plt = _plt()
  panels = ((f"sink_rate_raw", f"Sink$_{k}^{{{eps}}}$, raw weights (%)", 0, 100, RATE_CMAP, ".0f"),
            ("sink_rate_proxy", f"Sink$_{k}^{{{eps}}}$, Gu proxy (%)", 0, 100, RATE_CMAP, ".0f"),
            ("first_token_attn_raw", f"raw weight on token {k}", 0, 1, WEIGHT_CMAP, ".2f"),
            ("row_mass", "raw row mass (sum of weights)", 0, ROW_MASS_MAX, MASS_CMAP, ".2f"))
  n_layers = len(metrics["layers"])
  n_heads = _grid(metrics, "sink_rate_raw").shape[1]
  fig, axes = plt.subplots(1, 4, figsize=(4 * 3.3, 1.0 + 0.45 * max(n_layers, 2)), squeeze=False)
  for ax, (key, title, lo, hi, cmap, fmt) in zip(axes[0], panels):
    data = _grid(metrics, key)
    im = ax.imshow(np.clip(data, lo, hi), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    _int_ticks(ax, n_heads, n_layers)
    if n_layers * n_heads <= 64:
      for (i, j), val in np.ndenumerate(data):
        if np.isfinite(val):
          shade = (np.clip(val, lo, hi) - lo) / (hi - lo)
          ax.text(j, i, (">" if val > hi else "") + format(min(val, 999.0), fmt), ha="center", va="center",
                  fontsize=7, color="black" if shade > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend="max" if key == "row_mass" else "neither")
  fig.tight_layout()
  return _save(fig, path)


def select_heads(metrics: Mapping, num_heads: int) -> list[tuple[float, int, int]]:
  """The rule for the attention maps: the ``num_heads`` (layer, head) pairs with the largest raw importance
  ``alpha_k`` (mean attention key k receives), largest first; ties by layer then head."""
  ranked = [(float(layer["alpha_raw"][h]), l, h) for l, layer in enumerate(metrics["layers"])
            for h in range(len(layer.get("alpha_raw", ())))]
  return sorted(ranked, key=lambda x: (-x[0], x[1], x[2]))[:num_heads]


def plot_attention_maps(weights: Sequence, sink_mass: Sequence, metrics: Mapping, path: str, *,
                        num_sequences: int = 3, num_heads: int = 4, k: int = 1,
                        learned_sink: Sequence[bool] | None = None) -> str | None:
  """Grid of attention maps: one row per selected head (:func:`select_heads`), one column per probe sequence
  (the first ``num_sequences``). ``weights[l]`` is (batch, heads, q, k); ``sink_mass[l]`` (batch, heads, q) or
  None. A learned sink is drawn as its own column ("sink") left of the keys, after a white separator."""
  heads = select_heads(metrics, num_heads)
  if not heads:
    return None
  plt = _plt()
  n_seq = min(num_sequences, np.asarray(weights[heads[0][1]]).shape[0])
  fig, axes = plt.subplots(len(heads), n_seq, figsize=(2.9 * n_seq + 1.2, 2.7 * len(heads)), squeeze=False)
  im = None
  saturated = False
  for r, (alpha, l, h) in enumerate(heads):
    has_sink = learned_sink[l] if learned_sink is not None else sink_mass[l] is not None
    sink = np.asarray(sink_mass[l]) if has_sink and sink_mass[l] is not None else None
    for c in range(n_seq):
      ax = axes[r, c]
      w = np.asarray(weights[l][c, h], np.float64)
      q_len, kv_len = w.shape
      if sink is not None:
        w = np.concatenate([sink[c, h][:, None], np.full((q_len, 1), np.nan), w], axis=1)
      saturated |= bool(np.nanmax(w) > 1.0)
      cmap = plt.get_cmap(WEIGHT_CMAP).with_extremes(bad="white")
      im = ax.imshow(np.clip(w, 0, 1), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
      off = 2 if sink is not None else 0
      step = max(1, kv_len // 4)
      ticks = list(range(0, kv_len, step))
      ax.set_xticks([off + t for t in ticks], [str(t + 1) for t in ticks], fontsize=7)
      if sink is not None:
        ax.text(0, -0.6, "sink", rotation=90, ha="center", va="bottom", fontsize=7, color="C2")
      ax.set_yticks(ticks, [str(t + 1) for t in ticks], fontsize=7)
      if r == len(heads) - 1:
        ax.set_xlabel("key position")
      if c == 0:
        ax.set_ylabel(f"layer {l}, head {h}\nquery position", fontsize=8)
      if r == 0:
        ax.set_title(f"probe sequence {c}", fontsize=9)
      ax.text(0.97, 0.97, f"α$_{k}$ = {alpha:.2f}", transform=ax.transAxes, ha="right", va="top", fontsize=7,
              color="white")
  note = "; learned sink drawn as the left column" if any(
      (learned_sink[l] if learned_sink is not None else False) for _, l, _ in heads) else ""
  fig.suptitle(f"Attention weights: heads with the largest mean weight on token {k} (α$_{k}$, raw), "
               f"first {n_seq} probe sequences{note}", fontsize=9)
  fig.tight_layout()
  cb = fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.025, pad=0.02, extend="max" if saturated else "neither")
  cb.set_label("attention weight")
  return _save(fig, path)


def plot_norms(metrics: Mapping, path: str, *, k: int = 1) -> str:
  """First-token norm ratios: residual stream per state (0 = embeddings), values and keys per layer."""
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.2))
  ratios = [h["norm_ratio"] for h in metrics.get("hidden", [])]
  ax = axes[0]
  ax.plot(range(len(ratios)), ratios, "o-", color="C0", label=f"‖h$_{k}$‖ / mean ‖h$_t$‖")
  ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="equal norms")
  ax.set(xlabel="residual state (0 = embeddings, l = after block l)", ylabel="norm ratio (dimensionless)",
         title=f"hidden state of token {k}")
  ax.set_xticks(range(len(ratios)))
  ax.set_ylim(bottom=0)
  _legend_outside(ax)
  ax = axes[1]
  for key, label, style in (("value_norm_ratio", f"‖v$_{k}$‖ / mean ‖v$_t$‖", "s-"),
                            ("key_norm_ratio", f"‖k$_{k}$‖ / mean ‖k$_t$‖", "^--")):
    pts = [(l, float(np.mean(layer[key]))) for l, layer in enumerate(metrics["layers"]) if key in layer]
    if pts:
      ax.plot(*zip(*pts), style, label=label)
  ax.axhline(1.0, color="gray", lw=0.8, ls=":", label="equal norms")
  ax.set(xlabel="layer", ylabel="norm ratio (dimensionless)", title=f"value / key of token {k} (mean over heads)")
  ax.set_xticks(range(len(metrics["layers"])))
  ax.set_ylim(bottom=0)
  _legend_outside(ax)
  fig.tight_layout()
  return _save(fig, path)


def plot_massive(metrics: Mapping, path: str) -> str | None:
  """Sun et al. 2024 Fig. 2-style: the three largest ``|h|`` of each residual state and the median ``|h|``."""
  hidden = metrics.get("hidden", [])
  if not hidden:
    return None
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 3.2))
  x = np.arange(len(hidden))
  tops = np.array([np.pad(np.asarray(h.get("top3_abs_per_seq", h["top_abs"]), float)[:3],
                          (0, max(0, 3 - len(h.get("top3_abs_per_seq", h["top_abs"])))), constant_values=np.nan)
                   for h in hidden])
  for i, style in enumerate(("o-", "s--", "^:")):
    ax.plot(x, tops[:, i], style, label=f"top-{i + 1} |h|")
  ax.plot(x, [h.get("median_abs_per_seq", h["median_abs"]) for h in hidden], "k.-", label="median |h|")
  ax.set_yscale("log")
  ax.set_xticks(x)
  ax.set(xlabel="residual state (0 = embeddings, l = after block l)", ylabel="|activation| (hidden-state units)",
         title="massive activations (Sun et al. 2024): largest vs median |h|,\nper sequence, mean over probe sequences")
  for i, h in enumerate(hidden):
    ax.annotate(f"t{int(h['top_position'][0]) + 1}/c{int(h['top_channel'][0])}", (i, tops[i, 0]),
                textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6)
  ax.margins(y=0.25)
  _legend_outside(ax, title="label: position t / channel c\nof the largest |h| in the probe", title_fontsize=7)
  fig.tight_layout()
  return _save(fig, path)


CURVE_PANELS = (
    ("Sink$_1^{0.3}$ (% of heads)", (0, 100), (("sink_rate_raw", "raw weights"), ("sink_rate_proxy", "Gu proxy"))),
    ("attention weight (0-1)", (0, 1), (("first_token_attn_raw", "on token 1, raw"),
                                        ("first_token_attn_proxy", "on token 1, proxy"),
                                        ("sink_mass", "on the learned sink"))),
    ("norm ratio (dimensionless)", None, (("value_norm_ratio", "‖v$_1$‖ / mean ‖v$_t$‖"),
                                          ("massive_ratio", "max$_l$ ‖h$_1$‖ / mean ‖h$_t$‖"))),
)
# raw solid and wide, proxy dashed on top of it (they coincide for normalised attention), learned sink dotted
SERIES_STYLE = {"sink_rate_raw": dict(ls="-", lw=3.0, alpha=0.55, color="C0"),
                "sink_rate_proxy": dict(ls="--", lw=1.4, color="C1"),
                "first_token_attn_raw": dict(ls="-", lw=3.0, alpha=0.55, color="C0"),
                "first_token_attn_proxy": dict(ls="--", lw=1.4, color="C1"),
                "sink_mass": dict(ls="-.", lw=1.4, color="C2"),
                "value_norm_ratio": dict(ls="-", lw=1.6, color="C3"),
                "massive_ratio": dict(ls="--", lw=1.6, color="C4")}


def plot_curves(points: Sequence[Mapping], path: str, *, seq_len: int, title: str, xlabel: str = "training step",
                marker: str = "-") -> str | None:
  """The summary metrics against ``points[i]["step"]``: one panel per unit (rates in %, weights 0-1 with the
  uniform-attention reference, norm ratios); ``points`` hold the summary keys (or ``sinks/<key>``)."""
  def value(p, key):
    return p.get(key, p.get("sinks/" + key))
  pts = [p for p in points if "step" in p]
  if not pts:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.2))
  drawn = False
  for ax, (ylabel, ylim, series) in zip(axes, CURVE_PANELS):
    for key, label in series:
      xy = [(p["step"], value(p, key)) for p in pts if value(p, key) is not None]
      if xy and not (key == "sink_mass" and not any(v for _, v in xy)):
        ax.plot(*zip(*xy), label=label, ms=4, marker="o" if "o" in marker else None, **SERIES_STYLE.get(key, {}))
        drawn = True
    if ylim == (0, 1):
      ax.axhline(uniform_first_token_weight(seq_len), color="gray", ls=":", lw=1,
                 label=f"uniform attention (T = {seq_len})")
    if ylim is not None:
      ax.set_ylim(*ylim)
    else:
      ax.axhline(1.0, color="gray", ls=":", lw=0.8, label="equal norms")
      ax.set_ylim(bottom=0)
    steps = sorted({p["step"] for p in pts})
    if marker != "-" and len(steps) <= 12:  # checkpoints: a tick at each
      ax.set_xticks(steps)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    _legend_outside(ax)
  if not drawn:
    _plt().close(fig)
    return None
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return _save(fig, path)
