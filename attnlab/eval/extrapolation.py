"""Length extrapolation: held-out metrics at 1/4x, 1/2x, 1x, 2x, 4x, ... the training length, as a table and a
PNG curve (in bits/byte for byte-level text models, nats/token otherwise: a synthetic task such as
Bigram-Backcopy has its own symbols, not bytes)."""

from __future__ import annotations

import dataclasses
import itertools

from attnlab.data.pipeline import ArrayIterator, make_dataset
from attnlab.eval.lm_eval import evaluate_batches
from attnlab.eval.plotting import plot_vs_length


def heldout_batches(data_cfg, *, seq_len: int, batch_size: int, num_batches: int, tokenizer):
  """Up to ``num_batches`` held-out batches (0 -> all), never repeating a row of a finite split."""
  it = make_dataset(dataclasses.replace(data_cfg, batch_size=batch_size), split="validation", seq_len=seq_len,
                    tokenizer=tokenizer)
  if isinstance(it, ArrayIterator):
    available = max(it.num_rows // batch_size, 1)
    num_batches = available if num_batches == 0 else min(num_batches, available)
  elif num_batches == 0:
    raise ValueError("EvalConfig.num_batches must be positive for streaming or synthetic data")
  return list(itertools.islice(it, num_batches))


def length_extrapolation(exp_cfg, graphdef, params, rest, tokenizer) -> list[dict]:
  """One row per factor: {factor, seq_len, loss, perplexity, bits_per_byte, ...} or {..., skipped: reason}."""
  ecfg, dcfg = exp_cfg.eval, exp_cfg.data
  rows = []
  shorter = [q for q in (0.25, 0.5) if int(q * dcfg.seq_len) >= 8]  # the curve's left side: shorter contexts
  for f in shorter + sorted(ecfg.length_factors):
    L = int(f * dcfg.seq_len)
    if L > exp_cfg.model.max_seq_len:
      rows.append({"factor": f, "seq_len": L, "skipped": f"beyond ModelConfig.max_seq_len "
                                                        f"{exp_cfg.model.max_seq_len}"})
      continue
    bs = max(1, int((ecfg.batch_size or dcfg.batch_size) / f))  # constant tokens per batch
    batches = heldout_batches(dcfg, seq_len=L, batch_size=bs, num_batches=max(1, int(ecfg.num_batches * f)),
                              tokenizer=tokenizer)
    rows.append({"factor": f, "seq_len": L, **evaluate_batches(graphdef, params, rest, batches,
                                                              tokenizer.byte_lengths())})
  return rows


def is_byte_model(data_cfg) -> bool:
  """True when targets are bytes of text (bits/byte is meaningful): the byte tokenizer on a text source."""
  return data_cfg.tokenizer == "byte" and data_cfg.source != "synthetic"


def format_table(rows: list[dict]) -> str:
  lines = ["| factor | seq_len | loss (nats/token) | perplexity | bits/byte |", "|---|---|---|---|---|"]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['factor']:g}x | {r['seq_len']} | skipped: {r['skipped']} | | |")
    else:
      lines.append(f"| {r['factor']:g}x | {r['seq_len']} | {r['loss']:.4f} | {r['perplexity']:.3f} | "
                   f"{r['bits_per_byte']:.4f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "length extrapolation", *, byte_model: bool = True,
         train_len: int | None = None) -> str | None:
  key, ylabel = ("bits_per_byte", "held-out loss (bits/byte)") if byte_model else ("loss", "held-out loss (nats/token)")
  return plot_vs_length(rows, path, series=[(key, ylabel.split(" (")[0], "o-")], xlabel="evaluation length (tokens)",
                        ylabel=ylabel, title=title, mark_x=train_len)
