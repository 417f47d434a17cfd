"""One small plotting helper for evaluation curves against sequence length (matplotlib, headless)."""

from __future__ import annotations

import os


def plot_vs_length(rows: list[dict], path: str, *, series: list[tuple[str, str, str]], ylabel: str, title: str,
                   xlabel: str = "sequence length (tokens)", ylim: tuple[float, float] | None = None,
                   mark_x: float | None = None) -> str | None:
  """Plots ``row[key]`` against ``row["seq_len"]`` (log2 x axis) for each ``(key, label, style)`` in ``series``;
  rows marked ``skipped`` are left out. Returns ``path``, or None when there is nothing to plot."""
  done = [r for r in rows if "skipped" not in r]
  if not done:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, label, style in series:
    ax.plot([r["seq_len"] for r in done], [r[key] for r in done], style, label=label)
  if mark_x is not None:
    ax.axvline(mark_x, color="gray", ls=":", lw=1, label=f"training length ({mark_x})")
  ax.set_xscale("log", base=2)
  xs = sorted({r["seq_len"] for r in done})
  ax.set_xticks(xs, [str(x) for x in xs])
  ax.minorticks_off()
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if len(series) > 1 or mark_x is not None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=150, bbox_inches="tight")
  plt.close(fig)
  return path
