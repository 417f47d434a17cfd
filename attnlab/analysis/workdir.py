"""The sink reports of a trained run's state, written into its workdir (``attnlab sinks``, :mod:`attnlab.app.sinks`).

Writes ``DIR/sinks.json`` + PNGs (:func:`attnlab.analysis.write_sink_report`) on the probe batch of the run's data
(:mod:`attnlab.analysis.probe`: held-out sequences starting with BOS), with the run's ``metrics.jsonl`` as the
history (``sinks/*`` scalars vs step, if the run logged them). For text data it also writes
``DIR/sinks_no_bos/`` on the same text without the BOS (Gu et al. measure ``Sink_1`` on models trained without
one). ``sinks.json`` also holds the training step and the probe's next-token cross-entropy, split by the task's
query mask when it has one (Bigram-Backcopy: ``ce_masked`` = bigram positions, ``ce_unmasked`` = backcopy).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlab.analysis.probe import Probe, probe_batch
from attnlab.analysis.report import write_sink_report

NO_BOS_DIR = "sinks_no_bos"


@functools.lru_cache(maxsize=16)
def _logits_fn(graphdef):
  def run(params, rest, tokens):
    return nnx.merge(graphdef, params, rest, copy=True)(tokens)
  return jax.jit(run)


def probe_losses(eval_graphdef, params, rest, probe: Probe) -> dict[str, float]:
  """Mean next-token cross-entropy over the probe (and at masked / unmasked queries when the probe has a mask)."""
  tokens = jnp.asarray(probe.tokens)
  logits = _logits_fn(eval_graphdef)(params, rest, tokens)[:, :-1]  # query t predicts token t + 1
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))
  out = {"ce": float(ce.mean())}
  if probe.query_mask is not None:
    mask = probe.query_mask[:, :-1]
    if mask.any():
      out["ce_masked"] = float(ce[mask].mean())
    if (~mask).any():
      out["ce_unmasked"] = float(ce[~mask].mean())
  return out


def write_sink_reports(exp_cfg, workdir: str, step: int, eval_graphdef, state) -> dict:
  """Writes the sink report(s) of the train ``state`` at ``step`` into ``workdir``; returns ``{"bos": report,
  "no_bos": report or None}`` (the dicts written to ``sinks.json``)."""
  model = nnx.merge(eval_graphdef, state["params"], state["rest"])
  acfg = exp_cfg.analysis
  history = os.path.join(workdir, "metrics.jsonl")
  history = history if os.path.exists(history) else None
  out = {"bos": None, "no_bos": None}
  variants = [("bos", True, workdir)]
  if exp_cfg.data.source != "synthetic":
    variants.append(("no_bos", False, os.path.join(workdir, NO_BOS_DIR)))
  for name, bos, out_dir in variants:
    probe = probe_batch(exp_cfg.data, acfg, bos=bos)
    extra = {"step": step, "probe_bos": bos, "probe_loss": probe_losses(eval_graphdef, state["params"],
                                                                        state["rest"], probe)}
    out[name] = write_sink_report(model, probe.tokens, out_dir, history=history if bos else None, k=acfg.k,
                                  eps=acfg.eps, query_mask=probe.query_mask, extra=extra)
  return out


def format_summary(report: dict) -> str:
  """One line per summary metric of a report (what ``attnlab sinks`` prints)."""
  s = report["summary"]
  lines = [f"step {report.get('step')}, probe {report['probe']['batch']} x {report['probe']['seq']} "
           f"({'with' if report.get('probe_bos', True) else 'without'} BOS)"]
  lines += [f"  {key:24s} {value:.4g}" for key, value in s.items()]
  lines += [f"  {'probe ' + key:24s} {value:.4g}" for key, value in report.get("probe_loss", {}).items()]
  return "\n".join(lines)
