"""Held-out language-modelling metrics: loss, perplexity, bits-per-byte, next-token accuracy.

    loss = Σ_t m_t·nll_t / Σ_t m_t,   ppl = exp(loss),   bpb = Σ_t m_t·nll_t / (ln 2 · Σ_t m_t·bytes(y_t))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.state.forward import MODEL_INPUTS, forward, token_losses

BATCH_KEYS = MODEL_INPUTS + ("targets", "loss_mask")


@functools.lru_cache(maxsize=16)
def eval_step_fn(graphdef):
  """Jitted ``(params, rest, batch, byte_lengths) -> sums``; the forward's state updates are discarded."""

  def step(params, rest, batch, byte_lengths):
    logits, _, _ = forward(graphdef, params, rest, batch)
    nll, _ = token_losses(logits, batch["targets"])
    mask = batch["loss_mask"]
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"nll": jnp.sum(nll * mask), "tokens": jnp.sum(mask), "correct": jnp.sum(correct * mask),
            "bytes": jnp.sum(byte_lengths[batch["targets"]] * mask),
            "example_correct": jnp.sum(jnp.all((correct > 0) | (mask == 0), axis=-1))}

  return jax.jit(step)


def evaluate_batches(graphdef, params, rest, batches: Iterable[dict], byte_lengths: np.ndarray) -> dict:
  step = eval_step_fn(graphdef)
  byte_lengths = jnp.asarray(byte_lengths, jnp.float32)
  totals: dict[str, float] = {}
  n = 0
  for batch in batches:
    out = jax.device_get(step(params, rest, {k: batch[k] for k in BATCH_KEYS}, byte_lengths))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += len(batch["inputs"])
  if not totals or totals["tokens"] == 0:
    raise ValueError("evaluation saw no target tokens")
  loss = totals["nll"] / totals["tokens"]
  bpb = totals["nll"] / (math.log(2) * totals["bytes"]) if totals["bytes"] else float("nan")
  return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_byte": bpb,
          "accuracy": totals["correct"] / totals["tokens"], "example_accuracy": totals["example_correct"] / n,
          "tokens": int(totals["tokens"]), "examples": n}


@functools.lru_cache(maxsize=16)
def token_nll_fn(graphdef):
  """Jitted ``(params, rest, batch) -> (batch, seq)`` next-token NLL (nats)."""

  def step(params, rest, batch):
    logits, _, _ = forward(graphdef, params, rest, batch)
    return token_losses(logits, batch["targets"])[0]

  return jax.jit(step)


def task_losses(graphdef, params, rest, batches: Iterable[dict], query_mask_fn,
                names: tuple[str, str] = ("masked", "unmasked")) -> dict:
  """Mean NLL (nats/token) at the queries ``query_mask_fn(inputs)`` selects and at the others: a synthetic task's
  per-part losses (Bigram-Backcopy: ``bigram_ce`` at non-trigger queries, ``backcopy_ce`` at trigger queries)."""
  step = token_nll_fn(graphdef)
  sums = {names[0]: [0.0, 0], names[1]: [0.0, 0]}
  for batch in batches:
    nll = np.asarray(jax.device_get(step(params, rest, {k: batch[k] for k in BATCH_KEYS})))
    valid = np.asarray(batch["loss_mask"]) > 0
    sel = np.asarray(query_mask_fn(np.asarray(batch["inputs"])), bool)
    for name, m in ((names[0], sel & valid), (names[1], ~sel & valid)):
      sums[name][0] += float(nll[m].sum())
      sums[name][1] += int(m.sum())
  return {f"{name}_ce": (s / n if n else float("nan")) for name, (s, n) in sums.items()} | {
      f"{name}_tokens": n for name, (_, n) in sums.items()}
