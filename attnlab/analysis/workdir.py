"""The sink reports of a trained run's state, written into its workdir (``attnlab sinks``, :mod:`attnlab.app.sinks`).

Options (``attnlab sinks``): ``--step N`` restores any kept checkpoint (:func:`restore_step`) and writes into
``DIR/sinks_step<N>/``; ``--probe_file F`` probes your own text (:func:`attnlab.analysis.probe.file_probe`) into
``DIR/sinks_<name>/``; ``--bos on|off|both`` chooses the probe with BOS, without it, or both; ``--all_steps``
computes the summary metrics at every kept checkpoint (:func:`sinks_over_steps`, ``DIR/sinks_over_steps.{json,png}``:
Gu et al. 2025's emergence curve). Every call ends with a self-contained ``report.html`` (:func:`write_run_html`).

Writes ``DIR/sinks.json`` + PNGs (:func:`attnlab.analysis.write_sink_report`) on the probe batch of the run's data
(:mod:`attnlab.analysis.probe`: held-out sequences starting with BOS), with the run's ``metrics.jsonl`` as the
history (``sinks/*`` scalars vs step, if the run logged them). For text data it also writes
``DIR/sinks_no_bos/`` on the same text without the BOS (Gu et al. measure ``Sink_1`` on models trained without
one). ``sinks.json`` also holds the training step and the probe's next-token cross-entropy, split by the task's
query mask when it has one (Bigram-Backcopy: ``ce_masked`` = bigram positions, ``ce_unmasked`` = backcopy).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnlab.analysis import figures, html
from attnlab.analysis.metrics import model_metrics
from attnlab.analysis.probe import Probe, _internals_fn, file_probe, probe_batch
from attnlab.analysis.report import write_sink_report
from attnlab.state import Checkpointer, build_state

NO_BOS_DIR = "sinks_no_bos"
CURVE = "sinks_over_steps"
REPORT = "report.html"
BOS_CHOICES = ("on", "off", "both")


class _StepCheckpointer(Checkpointer):
  """A checkpointer whose "latest" step is the one asked for (``restore_latest`` then restores exactly it)."""

  only: int | None = None

  def all_steps(self) -> list[int]:
    steps = super().all_steps()
    return steps if self.only is None else [s for s in steps if s == self.only]


def kept_steps(cfg, workdir: str) -> list[int]:
  """The steps of ``workdir``'s kept checkpoints, ascending."""
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def restore_steps(cfg, workdir: str, steps=None):
  """Yields ``(step, eval graphdef, state)`` for each of ``steps`` (default: every kept checkpoint, ascending);
  ValueError naming the kept steps when one is not there."""
  kept = kept_steps(cfg, workdir)
  if not kept:
    raise ValueError(f"no checkpoint in {workdir!r} to restore")
  steps = kept if steps is None else list(steps)
  missing = [s for s in steps if s not in kept]
  if missing:
    raise ValueError(f"no checkpoint at step(s) {missing} in {workdir!r}; kept steps: {kept} "
                     "(keep more with TrainConfig.keep_checkpoints and TrainConfig.checkpoint_every)")
  _, eval_graphdef, like = build_state(cfg)
  ckpt = _StepCheckpointer(workdir, keep=cfg.train.keep_checkpoints)
  try:
    for step in steps:
      ckpt.only = step
      restored = ckpt.restore_latest(like)
      if restored is None:
        raise ValueError(f"the checkpoint at step {step} of {workdir!r} could not be read")
      yield step, eval_graphdef, restored[1]
  finally:
    ckpt.close()


def restore_step(cfg, workdir: str, step: int | None = None):
  """``(step, eval graphdef, state)`` of the kept checkpoint at ``step`` (None: the newest)."""
  if step is None:
    kept = kept_steps(cfg, workdir)
    if not kept:
      raise ValueError(f"no checkpoint in {workdir!r} to restore")
    step = kept[-1]
  return next(iter(restore_steps(cfg, workdir, [step])))


def default_bos(data_cfg) -> str:
  """Synthetic tasks (their rows always start with BOS): "on"; text: "both" (Gu et al. probe without BOS)."""
  return "on" if data_cfg.source == "synthetic" else "both"


def report_dir(workdir: str, *, step: int | None = None, probe_file: str | None = None) -> str:
  """Where a report goes: ``DIR`` for the newest step on the held-out split, else ``DIR/sinks[_step<N>][_<name>]``."""
  parts = ([f"step{step}"] if step is not None else []) + (
      [os.path.splitext(os.path.basename(probe_file))[0]] if probe_file else [])
  return os.path.join(workdir, "sinks_" + "_".join(parts)) if parts else workdir


def make_probe(exp_cfg, *, bos: bool, probe_file: str | None = None) -> Probe:
  if probe_file:
    return file_probe(probe_file, exp_cfg.data, exp_cfg.analysis, bos=bos)
  return probe_batch(exp_cfg.data, exp_cfg.analysis, bos=bos)


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


def write_sink_reports(exp_cfg, workdir: str, step: int, eval_graphdef, state, *, bos: str | None = None,
                       probe_file: str | None = None, out_dir: str | None = None) -> dict:
  """Writes the sink report(s) of the train ``state`` at ``step`` into ``out_dir`` (default ``workdir``; the
  report without BOS into ``out_dir/sinks_no_bos``); returns ``{"bos": report or None, "no_bos": report or None,
  "dir": out_dir}`` (the dicts written to ``sinks.json``)."""
  bos = bos or default_bos(exp_cfg.data)
  if bos not in BOS_CHOICES:
    raise ValueError(f"bos must be one of {BOS_CHOICES}; got {bos!r}")
  out_dir = out_dir or workdir
  model = nnx.merge(eval_graphdef, state["params"], state["rest"])
  acfg = exp_cfg.analysis
  history = os.path.join(workdir, "metrics.jsonl")
  history = history if os.path.exists(history) and out_dir == workdir else None
  out = {"bos": None, "no_bos": None, "dir": out_dir}
  variants = ([("bos", True, out_dir)] if bos in ("on", "both") else []) + (
      [("no_bos", False, os.path.join(out_dir, NO_BOS_DIR))] if bos in ("off", "both") else [])
  for name, with_bos, where in variants:
    probe = make_probe(exp_cfg, bos=with_bos, probe_file=probe_file)
    extra = {"step": step, "probe_bos": with_bos, "probe_source": probe_file or "held-out split",
             "probe_loss": probe_losses(eval_graphdef, state["params"], state["rest"], probe)}
    out[name] = write_sink_report(model, probe.tokens, where, history=history if with_bos else None, k=acfg.k,
                                  eps=acfg.eps, query_mask=probe.query_mask, extra=extra)
  return out


def sinks_over_steps(exp_cfg, workdir: str, *, bos: str | None = None, probe_file: str | None = None,
                     steps=None, log=None) -> dict:
  """The summary sink metrics at every kept checkpoint on one fixed probe (Gu et al. 2025's sink-vs-step curve):
  writes ``workdir/sinks_over_steps.json`` and ``.png`` (``_no_bos`` variants for a probe without BOS)."""
  bos = bos or default_bos(exp_cfg.data)
  acfg = exp_cfg.analysis
  probes = {name: make_probe(exp_cfg, bos=b, probe_file=probe_file)
            for name, b in (("bos", True), ("no_bos", False)) if bos in (("on", "both") if b else ("off", "both"))}
  points = {name: [] for name in probes}
  if log and steps is None and len(kept_steps(exp_cfg, workdir)) < 3:
    log(f"only {len(kept_steps(exp_cfg, workdir))} kept checkpoint(s) in {workdir}: for a curve, train with more "
        "(TrainConfig.checkpoint_every and TrainConfig.keep_checkpoints)")
  for step, eval_graphdef, state in restore_steps(exp_cfg, workdir, steps):
    for name, probe in probes.items():
      internals = _internals_fn(eval_graphdef)(state["params"], state["rest"], probe.tokens)
      m = model_metrics(internals, k=acfg.k, eps=acfg.eps, query_mask=probe.query_mask)
      ce = probe_losses(eval_graphdef, state["params"], state["rest"], probe)
      points[name].append({"step": step, **m["summary"], **{f"probe_{k}": v for k, v in ce.items()}})
    if log:
      log(f"step {step}: " + ", ".join(f"{n} Sink_1 raw {p[-1].get('sink_rate_raw', float('nan')):.1f} %"
                                      for n, p in points.items()))
  result = {"probe_source": probe_file or "held-out split", "probe_seq": int(next(iter(probes.values())).tokens.shape[1]),
            "probe_sequences": int(next(iter(probes.values())).tokens.shape[0]), "k": acfg.k, "eps": acfg.eps,
            "curves": points, "files": []}
  for name, pts in points.items():
    suffix = "" if name == "bos" else "_" + name
    png = figures.plot_curves(
        pts, os.path.join(workdir, CURVE + suffix + ".png"), seq_len=result["probe_seq"], marker="o-",
        xlabel="training step (kept checkpoints)",
        title=f"sink metrics over the kept checkpoints ({'with' if name == 'bos' else 'without'} BOS; probe "
              f"{result['probe_sequences']} x {result['probe_seq']} tokens from the {result['probe_source']})")
    if png:
      result["files"].append(os.path.basename(png))
  with open(os.path.join(workdir, CURVE + ".json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def _config_text(workdir: str) -> tuple[str, str]:
  for name in ("operative_config.gin", "config.gin"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        return name, f.read()
  return "", ""


FIGURES = (("sink_rate.png", "Per layer and head: Sink_1 on raw weights and on Gu et al.'s proxy (%), the raw weight "
            "on token 1 (0-1) and the raw row mass (1 = normalised)."),
           ("attention_maps.png", "Attention maps of the heads with the largest raw weight on token 1, on the first "
            "probe sequences (learned sink slot, if any, as its own column)."),
           ("norm_ratio.png", "First-token norm ratios of the residual stream, values and keys."),
           ("massive_activations.png", "Massive activations (Sun et al. 2024): largest |h| vs the median, per "
            "residual state."),
           ("history.png", "Sink metrics during training (metrics.jsonl)."))


def write_run_html(workdir: str, out_dir: str | None = None) -> str:
  """``out_dir/report.html`` (default ``workdir``): the sink report(s) in ``out_dir``, the run's ``eval.json``, the
  sink-over-checkpoints curve and streaming results when present, the operative config and links to the JSON."""
  out_dir = out_dir or workdir
  bos = html.read_json(os.path.join(out_dir, "sinks.json"))
  no_bos = html.read_json(os.path.join(out_dir, NO_BOS_DIR, "sinks.json"))
  main = bos or no_bos
  title = f"attnlab sink report: {os.path.abspath(workdir)}"
  body = []
  if main:
    body.append(f"<p>Step {main.get('step')}; probe: {main['probe']['batch']} sequences x {main['probe']['seq']} "
                f"tokens from the {html.esc(main.get('probe_source', 'held-out split'))}; Sink_k^eps with k = "
                f"{main.get('k')}, eps = {main.get('eps')}. Uniform causal attention would put "
                f"{main.get('uniform_first_token_weight', float('nan')):.3f} on token 1.</p>")
    body += ["<h2>Summary</h2>", html.summary_table({"with BOS": bos, "without BOS": no_bos})]
    body += ["<h2>Massive activations (Sun et al. 2024)</h2>",
             '<p class="note">Massive: |h| &gt; 100 and at least 1000x the median |h| of the layer.</p>',
             html.massive_table(main)]
    sel = main.get("selected_heads")
    if sel:
      body.append(f'<p class="note">Attention maps: heads chosen by {html.esc(sel["rule"])}: '
                  f'{html.esc(sel["heads"])} (layer, head).</p>')
  for label, sub in (("with BOS", out_dir), ("without BOS", os.path.join(out_dir, NO_BOS_DIR))):
    rep = bos if sub == out_dir else no_bos
    if not rep:
      continue
    body.append(f"<h2>Figures, probe {label}</h2>")
    for name, caption in FIGURES:
      if name in rep.get("files", []):
        body.append(html.figure(html.rel(os.path.join(sub, name), out_dir), caption))
  curve = html.read_json(os.path.join(workdir, CURVE + ".json"))
  if curve:
    body.append("<h2>Sink metrics over the kept checkpoints</h2>")
    for name in curve.get("files", []):
      body.append(html.figure(html.rel(os.path.join(workdir, name), out_dir), name))
    for variant, pts in curve["curves"].items():
      body.append(html.table(["step", "Sink_1 raw %", "Sink_1 proxy %", "raw weight on token 1", "probe CE"],
                             [[p["step"], p.get("sink_rate_raw"), p.get("sink_rate_proxy"),
                               p.get("first_token_attn_raw"), p.get("probe_ce")] for p in pts]))
  ev = html.read_json(os.path.join(workdir, "eval.json"))
  if ev:
    body.append("<h2>Evaluation (eval.json)</h2>")
    held = ev.get("heldout") or {}
    body.append(html.table(["metric", "value"], [[k, v] for k, v in held.items() if not isinstance(v, dict)] +
                           [[k, v] for k, v in (ev.get("per_task") or {}).items()]))
    if ev.get("length_extrapolation_plot"):
      body.append(html.figure(html.rel(os.path.join(workdir, ev["length_extrapolation_plot"]), out_dir),
                              "Held-out loss against the evaluation length."))
  stream = os.path.join(workdir, "streaming", "streaming.png")
  if os.path.exists(stream):
    body += ["<h2>Streaming (StreamingLLM)</h2>", html.figure(html.rel(stream, out_dir), "streaming perplexity")]
  body.append("<h2>Files</h2>")
  body.append(html.links(html.existing(out_dir, [
      ("sinks.json (probe with BOS)", os.path.join(out_dir, "sinks.json")),
      ("sinks.json (probe without BOS)", os.path.join(out_dir, NO_BOS_DIR, "sinks.json")),
      ("sinks_over_steps.json", os.path.join(workdir, CURVE + ".json")),
      ("eval.json", os.path.join(workdir, "eval.json")), ("metrics.jsonl", os.path.join(workdir, "metrics.jsonl")),
      ("streaming.json", os.path.join(workdir, "streaming", "streaming.json")),
      ("operative_config.gin", os.path.join(workdir, "operative_config.gin")),
      ("config.gin", os.path.join(workdir, "config.gin"))])))
  name, text = _config_text(workdir)
  if text:
    body += [f"<h2>Operative config ({name})</h2>", html.pre(text)]
  return html.write(os.path.join(out_dir, REPORT), title, body)


def format_summary(report: dict) -> str:
  """One line per summary metric of a report (what ``attnlab sinks`` prints)."""
  s = report["summary"]
  lines = [f"step {report.get('step')}, probe {report['probe']['batch']} x {report['probe']['seq']} "
           f"({'with' if report.get('probe_bos', True) else 'without'} BOS, {report.get('probe_source', 'held-out')})"]
  lines += [f"  {key:24s} {value:.4g}" for key, value in s.items()]
  lines += [f"  {'probe ' + key:24s} {value:.4g}" for key, value in report.get("probe_loss", {}).items()]
  return "\n".join(lines)
