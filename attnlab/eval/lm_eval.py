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
