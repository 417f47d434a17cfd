"""Full evaluation of a model state -> ``workdir/eval.json`` (+ ``length_extrapolation.png``, ``passkey.png``)."""

from __future__ import annotations

import json
import os

import jax

from attnlab.data.synthetic import PasskeyConfig
from attnlab.data.tokenizer import make_tokenizer
from attnlab.eval import extrapolation, passkey


def run_evaluation(exp_cfg, eval_graphdef, params, rest, workdir: str, *, step: int) -> dict:
  """Held-out metrics at the training length, the length-extrapolation table and plot, and passkey accuracy."""
  tokenizer = make_tokenizer(exp_cfg.data.tokenizer)
  rows = extrapolation.length_extrapolation(exp_cfg, eval_graphdef, params, rest, tokenizer)
  result = {"step": step, "heldout": next((r for r in rows if r.get("factor") == 1 and "skipped" not in r), None),
            "length_extrapolation": rows, "length_extrapolation_table": extrapolation.format_table(rows)}
  main = jax.process_index() == 0  # every process evaluates (the arrays may be sharded); process 0 writes
  png = extrapolation.plot(rows, os.path.join(workdir, "length_extrapolation.png")) if main else None
  if png:
    result["length_extrapolation_plot"] = os.path.basename(png)
  ecfg = exp_cfg.eval
  if ecfg.passkey_lengths:
    scorer = passkey.make_scorer(exp_cfg, eval_graphdef, params, rest)
    task = exp_cfg.data.task  # a model trained on passkey rows is evaluated in the same format
    preamble = task.preamble if isinstance(task, PasskeyConfig) else None
    rows = passkey.passkey_accuracy(scorer, tokenizer, lengths=ecfg.passkey_lengths,
                                    num_examples=ecfg.passkey_examples, digits=ecfg.passkey_digits, preamble=preamble,
                                    batch_size=ecfg.batch_size or exp_cfg.data.batch_size)
    result.update(passkey=rows, passkey_table=passkey.format_table(rows))
    png = passkey.plot(rows, os.path.join(workdir, "passkey.png")) if main else None
    if png:
      result["passkey_plot"] = os.path.basename(png)
  path = os.path.join(workdir, "eval.json")
  if not main:
    return result
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
  return result

