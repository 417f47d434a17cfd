"""The StreamingLLM table of a trained run (Xiao et al. 2024, Table 1-3), written into its workdir
(``attnlab stream``, :mod:`attnlab.app.stream`).

Streams ``num_streams`` held-out sequences of ``length`` tokens (BOS only at the start) through the run's model
under full attention (when ``length`` fits ``max_seq_len``), a window-only cache (0 + W) and sink + window caches
(S + W - S) of equal size, for every cache size W, sink count S and position mode (``pos_shift``: positions
inside the cache, as StreamingLLM; or the original positions) asked for. Each setting goes to its own
``DIR/streaming/W<W>_sink<S>_<posshift|origpos>/streaming.{json,png}`` (NLL against the position with labelled
full / window / sink+window lines); ``DIR/streaming/streaming.{md,json,png}`` hold the table of every setting and
the perplexity against the number of sink tokens. Needs softmax ``dot_product`` layers with RoPE/NoPE (see
:mod:`attnlab.streaming.eval`).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from flax import nnx

from attnlab.data import sources, synthetic
from attnlab.data.tokenizer import make_tokenizer
from attnlab.streaming.cache import StreamingPolicy
from attnlab.streaming.eval import streaming_perplexity


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


def setting_name(window: int, n_sink: int, pos_shift: bool) -> str:
  return f"W{window}_sink{n_sink}_{'posshift' if pos_shift else 'origpos'}"


def _smooth(nll, width: int):
  nll = np.asarray(nll, float)
  width = max(1, min(width, len(nll)))
  return np.arange(width, len(nll) + 1), np.convolve(nll, np.ones(width) / width, mode="valid")


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_setting(results: dict, path: str, *, title: str, unit: str, smooth: int = 32,
                 capacity: int | None = None) -> str:
  """NLL against the stream position: full attention (where it fits), sink + window (wide, light) and window only
  (dashed, on top: the two coincide for a model without a sink)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(7, 3.4))
  styles = {"full": ("k", "-", 1.4), "window": ("C3", "--", 1.2), "sink+window": ("C0", "-", 3.0)}
  order = [n for n in ("full", "sink+window", "window") if n in results] + [
      n for n in results if n not in ("full", "sink+window", "window")]
  for name in order:
    r = results[name]
    if r.get("nll_by_position") is None:
      continue
    color, ls, lw = styles.get(name, ("C2", ":", 1.2))
    label = {"full": "full attention", "window": f"window only ({r['policy']})",
             "sink+window": f"sink + window ({r['policy']})"}.get(name, name)
    ax.plot(*_smooth(r["nll_by_position"], smooth), color=color, ls=ls, lw=lw, alpha=0.5 if lw > 2 else 1.0,
            label=f"{label}, ppl {r['ppl']:.2f}")
  if "full" in results and results["full"].get("nll_by_position") is None:
    ax.plot([], [], " ", label=f"full attention: n/a ({results['full']['policy']})")
  if capacity:
    ax.axvline(capacity, color="gray", ls=":", lw=1, label=f"cache full (position {capacity})")
  ax.set(xlabel="position in the stream (tokens)", ylabel=f"NLL ({unit}),\nrunning mean over {smooth} tokens",
         title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
  fig.savefig(path, dpi=150, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_summary(rows: list[dict], path: str, *, full_ppl: float | None, title: str) -> str:
  """Perplexity against the number of sink tokens (0 = window only), one line per cache size and position mode."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 3.4))
  keys = sorted({(r["window"], r["pos_shift"]) for r in rows})
  for i, (w, shift) in enumerate(keys):
    pts = sorted((r["n_sink"], r["ppl"]) for r in rows if (r["window"], r["pos_shift"]) == (w, shift))
    ax.plot(*zip(*pts), "o-" if shift else "s--", color=f"C{i}",
            label=f"cache {w}, {'positions in cache' if shift else 'original positions'}")
  if full_ppl is not None:
    ax.axhline(full_ppl, color="k", lw=1.2, label=f"full attention ({full_ppl:.2f})")
  ax.set_xticks(sorted({r["n_sink"] for r in rows}))
  ax.set(xlabel="sink tokens kept (0 = window only)", ylabel="perplexity (per token)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
  fig.savefig(path, dpi=150, bbox_inches="tight")
  plt.close(fig)
  return path


def write_run_streaming_report(exp_cfg, workdir: str, eval_graphdef, state, *, length: int = 512,
                               num_streams: int = 4, windows=None, n_sinks=(4,), pos_shifts=(True,)) -> str:
  """Writes the streaming report of the train ``state`` into ``workdir/streaming`` (see the module docstring);
  returns the Markdown table."""
  windows = list(windows or [exp_cfg.data.seq_len])
  for w in windows:
    for s in n_sinks:
      if not 0 < s < w:
        raise ValueError(f"need 0 < n_sink ({s}) < window ({w})")
  model = nnx.merge(eval_graphdef, state["params"], state["rest"])
  tokens = heldout_streams(exp_cfg.data, length=length, num_streams=num_streams)
  unit = "nats/token"
  base = os.path.join(workdir, "streaming")
  os.makedirs(base, exist_ok=True)
  full = streaming_perplexity(model, tokens, {}, full=True).get("full")
  rows, settings = [], []
  for w in windows:
    for shift in pos_shifts:
      window_only = streaming_perplexity(model, tokens, {"window": StreamingPolicy(0, w, pos_shift=shift)},
                                         full=False)["window"]
      rows.append({"window": w, "n_sink": 0, "pos_shift": shift, "ppl": window_only["ppl"],
                   "policy": f"0+{w}"})
      for s in n_sinks:
        res = streaming_perplexity(model, tokens, {"sink+window": StreamingPolicy(s, w - s, pos_shift=shift)},
                                   full=False)["sink+window"]
        name = setting_name(w, s, shift)
        results = {"full": full, "window": window_only, "sink+window": res}
        out = os.path.join(base, name)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "streaming.json"), "w") as f:
          json.dump({"window": w, "n_sink": s, "pos_shift": shift, "length": length, "num_streams": num_streams,
                     "results": results}, f, indent=1)
        plot_setting(results, os.path.join(out, "streaming.png"), unit=unit, capacity=w,
                     title=f"StreamingLLM, cache {w} = {s} sink + {w - s} recent, "
                           f"{'positions in cache' if shift else 'original positions'}")
        rows.append({"window": w, "n_sink": s, "pos_shift": shift, "ppl": res["ppl"], "policy": f"{s}+{w - s}",
                     "dir": name})
        settings.append(name)
  full_ppl = full["ppl"] if full else None
  lines = [f"Perplexity of {num_streams} held-out streams of {length} tokens (full attention: "
           f"{'n/a, ' + full['policy'] if full_ppl is None else format(full_ppl, '.3f')}).", "",
           "| cache | policy | positions | perplexity | directory |", "|---|---|---|---|---|"]
  for r in rows:
    kind = "sink+window" if r["n_sink"] else "window"
    lines.append(f"| {kind} | {r['policy']} | {'in cache' if r['pos_shift'] else 'original'} | "
                 f"{r['ppl']:.3f} | {r.get('dir', '')} |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(base, "streaming.md"), "w") as f:
    f.write(table)
  with open(os.path.join(base, "streaming.json"), "w") as f:
    json.dump({"length": length, "num_streams": num_streams, "full_ppl": full_ppl, "rows": rows,
               "settings": settings}, f, indent=1)
  plot_summary(rows, os.path.join(base, "streaming.png"), full_ppl=full_ppl if full_ppl and math.isfinite(full_ppl)
               else None, title=f"StreamingLLM: {num_streams} streams of {length} tokens")
  return table
