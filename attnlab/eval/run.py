"""Full evaluation of a model state -> ``workdir/eval.json`` (+ ``length_extrapolation.png``, ``passkey.png``)."""

from __future__ import annotations

import json
import os

import jax

from attnlab.data.synthetic import PasskeyConfig
from attnlab.data.tokenizer import make_tokenizer
from attnlab.eval import extrapolation, lm_eval, passkey

# Synthetic tasks whose query mask splits the loss into named parts (mask True -> first name).
TASK_PARTS = {"BigramBackcopyConfig": ("bigram", "backcopy")}


def run_evaluation(exp_cfg, eval_graphdef, params, rest, workdir: str, *, step: int) -> dict:
  """Held-out metrics at the training length, the length-extrapolation table and plot, and passkey accuracy."""
  tokenizer = make_tokenizer(exp_cfg.data.tokenizer)
  rows = extrapolation.length_extrapolation(exp_cfg, eval_graphdef, params, rest, tokenizer)
  ecfg, dcfg = exp_cfg.eval, exp_cfg.data
  held = next((dict(r) for r in rows if r.get("factor") == 1 and "skipped" not in r), None)
  if held is not None:  # say which split and how much data the numbers are over
    held.update(split="validation", num_batches=ecfg.num_batches, batch_size=ecfg.batch_size or dcfg.batch_size,
                seq_len=dcfg.seq_len)
  n = ecfg.num_batches
  result = {"step": step, "heldout": held,
            "metrics": {} if held is None else {f"validation/loss_nats_per_token@{n}_batches": held["loss"],
                                                f"validation/bits_per_byte@{n}_batches": held["bits_per_byte"]},
            "metric_notes": {
                "heldout": f"validation split, EvalConfig.num_batches = {n} batches of "
                           f"{ecfg.batch_size or dcfg.batch_size} x {dcfg.seq_len} tokens",
                "metrics.jsonl eval/loss": f"the same split during training, over EvalConfig.in_training_batches = "
                                           f"{ecfg.in_training_batches} batches (so it differs from heldout.loss)"},
            "length_extrapolation": rows, "length_extrapolation_table": extrapolation.format_table(rows)}
  parts = TASK_PARTS.get(type(dcfg.task).__name__)
  mask_fn = getattr(dcfg.task, "probe_query_mask", None)
  if parts and mask_fn is not None:
    batches = extrapolation.heldout_batches(dcfg, seq_len=dcfg.seq_len, batch_size=ecfg.batch_size or dcfg.batch_size,
                                            num_batches=n or 1, tokenizer=tokenizer)
    result["per_task"] = lm_eval.task_losses(eval_graphdef, params, rest, batches, mask_fn, parts)
    result["metric_notes"]["per_task"] = (f"nats/token on the validation split ({n or 1} batches): "
                                          f"{parts[0]}_ce at non-trigger queries, {parts[1]}_ce at trigger queries")
  main = jax.process_index() == 0  # every process evaluates (the arrays may be sharded); process 0 writes
  byte_model = extrapolation.is_byte_model(dcfg)
  png = extrapolation.plot(rows, os.path.join(workdir, "length_extrapolation.png"), byte_model=byte_model,
                           train_len=dcfg.seq_len,
                           title=f"held-out loss vs evaluation length (trained at {dcfg.seq_len} tokens)" + (
                               f"\nnot shown: {', '.join(str(r['seq_len']) for r in rows if 'skipped' in r)} tokens, "
                               f"beyond max_seq_len {exp_cfg.model.max_seq_len}" if any('skipped' in r for r in rows)
                               else "")) if main else None
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

