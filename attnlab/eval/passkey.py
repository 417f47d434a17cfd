"""Passkey retrieval accuracy vs context length (Landmark format, :class:`attnlab.data.PasskeyConfig`).

An example counts as retrieved when greedy decoding reproduces every digit of the key: with teacher forcing
this is "argmax is right at every answer position", one scoring pass per batch. Contexts are scored by a
*scorer* (plain token ids (batch, L) -> logits (batch, L, vocab)), so the same evaluation serves

* :func:`forward_scorer`: one full forward pass (up to ``ModelConfig.max_seq_len``); for a model trained with
  landmark tokens they are inserted block-aligned and their positions dropped from the logits;
* :func:`landmark_scorer`: chunked landmark inference with top-k block retrieval
  (:class:`attnlab.eval.landmark_runner.LandmarkRunner`), with no length limit.

:func:`make_scorer` picks one from ``EvalConfig.passkey_inference`` ("auto": landmark retrieval when every layer
is landmark attention, otherwise a forward pass).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.attention.variants.landmark import LandmarkConfig
from attnlab.data.landmark import insert_landmarks
from attnlab.data.special_tokens import LandmarkTokens
from attnlab.data.synthetic import PASSKEY_PREFIX, PasskeyConfig, passkey_row
from attnlab.eval.landmark_runner import LandmarkRunner, max_chunk_len
from attnlab.eval.plotting import plot_vs_length
from attnlab.state.forward import forward

INFERENCE = ("auto", "forward", "landmark")


@dataclasses.dataclass(frozen=True)
class Scorer:
  """``fn(inputs (batch, L) int32) -> logits (batch, L, vocab)``; ``max_len``: longest plain context it can score
  (None: unbounded); ``name``: how it infers (recorded in eval.json)."""

  fn: Callable[[np.ndarray], np.ndarray]
  max_len: int | None
  name: str

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    return np.asarray(self.fn(inputs))


@functools.lru_cache(maxsize=8)
def _logits_fn(graphdef):

  def run(params, rest, inputs):
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    logits, _, _ = forward(graphdef, params, rest, {"inputs": inputs, "positions": positions, "segment_ids": None})
    return logits

  return jax.jit(run)


def forward_scorer(graphdef, params, rest, *, max_seq_len: int, special_tokens=None) -> Scorer:
  """A full forward pass; with :class:`LandmarkTokens` the landmarks are inserted (block-aligned, as the retrieval
  runner does) and dropped from the output. Meta tokens are not injected into evaluation prompts."""
  run = functools.partial(_logits_fn(graphdef), params, rest)
  if not isinstance(special_tokens, LandmarkTokens):
    return Scorer(lambda x: run(jnp.asarray(x, jnp.int32)), max_seq_len, "forward")
  spec = special_tokens

  def fn(inputs):
    stream, is_lm = insert_landmarks(np.asarray(inputs), spec.landmark_id, spec.block_size)
    return np.asarray(run(jnp.asarray(stream, jnp.int32)))[:, ~is_lm]

  m = spec.block_size - 1
  max_len = max_seq_len - max_seq_len // spec.block_size  # longest L with L + L // m <= max_seq_len
  if max_len + max_len // m > max_seq_len:
    max_len -= 1
  return Scorer(fn, max_len, "forward (landmarks inserted)")


def landmark_scorer(graphdef, params, rest, *, chunk_len: int, top_k: int | None = None,
                    cache_blocks: int | None = None) -> Scorer:
  """Chunked landmark inference with top-k retrieval (any context length)."""
  runner = LandmarkRunner(nnx.merge(graphdef, params, rest), chunk_len=chunk_len, top_k=top_k,
                          cache_blocks=cache_blocks)
  return Scorer(runner.score, None, f"landmark retrieval (chunk {chunk_len}, top_k {runner.top_k}, "
                                    f"cache {runner.cache_blocks} blocks)")


def make_scorer(exp_cfg, graphdef, params, rest) -> Scorer:
  """The scorer ``EvalConfig.passkey_inference`` asks for (see the module docstring)."""
  mode, model = exp_cfg.eval.passkey_inference, exp_cfg.model
  all_landmark = all(isinstance(a, LandmarkConfig) for a in model.attention_pattern)
  if mode == "landmark" and not all_landmark:
    raise ValueError("EvalConfig.passkey_inference='landmark' needs a model whose every layer is LandmarkConfig")
  if mode == "landmark" or (mode == "auto" and all_landmark):
    lm = model.attention_pattern[0]
    chunk = exp_cfg.eval.landmark_chunk_len or max_chunk_len(exp_cfg.data.seq_len, lm.block_size, lm.top_k)
    return landmark_scorer(graphdef, params, rest, chunk_len=chunk)
  return forward_scorer(graphdef, params, rest, max_seq_len=model.max_seq_len,
                        special_tokens=exp_cfg.data.special_tokens)


def passkey_accuracy(scorer: Scorer, tokenizer, *, lengths, num_examples: int, digits: int = 5,
                     preamble: bool | None = None, batch_size: int = 8, seed: int = 1234) -> list[dict]:
  """One row per context length ``L`` (plain tokens): {seq_len, accuracy (all digits), digit_accuracy, examples,
  inference} or {seq_len, skipped}. Examples depend only on (seed, L, index). ``preamble`` None: the paper's
  instruction sentence when ``L`` leaves room for it (``L >= 2 × its length``); a bool forces it (e.g. to match
  the training task)."""
  rows = []
  for L in lengths:
    if scorer.max_len is not None and L > scorer.max_len:
      rows.append({"seq_len": L, "skipped": f"beyond what {scorer.name} can score ({scorer.max_len} tokens)"})
      continue
    cfg = PasskeyConfig(digits=digits, preamble=L >= 2 * len(PASSKEY_PREFIX) if preamble is None else preamble)
    ex = [passkey_row(cfg, np.random.default_rng([seed, L, i]), L, tokenizer) for i in range(num_examples)]
    right, digits_right, digits_total = 0, 0, 0
    for s in range(0, num_examples, batch_size):
      tok = np.stack([t for t, _ in ex[s:s + batch_size]])
      mask = np.stack([m for _, m in ex[s:s + batch_size]]) > 0
      correct = (scorer(tok[:, :-1]).argmax(-1) == tok[:, 1:]) | ~mask
      right += int(np.all(correct, axis=-1).sum())
      digits_right += int((correct & mask).sum())
      digits_total += int(mask.sum())
    rows.append({"seq_len": L, "accuracy": right / num_examples, "digit_accuracy": digits_right / digits_total,
                 "examples": num_examples, "inference": scorer.name})
  return rows


def format_table(rows: list[dict]) -> str:
  lines = ["| context | passkey accuracy | digit accuracy | inference |", "|---|---|---|---|"]
  for r in rows:
    if "skipped" in r:
      lines.append(f"| {r['seq_len']} | skipped: {r['skipped']} | | |")
    else:
      lines.append(f"| {r['seq_len']} | {r['accuracy']:.3f} | {r['digit_accuracy']:.3f} | {r['inference']} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str = "passkey retrieval") -> str | None:
  return plot_vs_length(rows, path, series=[("accuracy", "passkey (all digits)", "o-"),
                                            ("digit_accuracy", "digits", "s--")],
                        xlabel="context length (tokens)", ylabel="accuracy", title=title, ylim=(-0.05, 1.05))
