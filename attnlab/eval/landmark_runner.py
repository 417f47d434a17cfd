"""Chunk-by-chunk landmark inference for a :class:`attnlab.model.lm.DecoderLM` (scoring and greedy decoding).

Mohtashami & Jaggi 2023: the context is fed in chunks; every layer attends over
``[top-k retrieved blocks | incomplete block | chunk]`` (:func:`attnlab.attention.landmark.retrieval_attention`)
and caches complete blocks. The runner inserts a landmark after every ``block_size - 1`` real tokens itself and
drops the landmark positions from its outputs, so callers (passkey / length-extrapolation evals) pass plain
token ids. Every layer of the model must be :class:`LandmarkAttention` with the same block size and landmark id.
The reference caps the chunk at ``train_len - train_len % B - (top_k + 1)·B`` (:func:`max_chunk_len`) so that
relative distances stay within the training length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlab.attention.variants.landmark import LandmarkAttention
from attnlab.data.landmark import insert_landmarks


def max_chunk_len(train_len: int, block_size: int, top_k: int) -> int:
  """The reference chunk length ``train_len - train_len % B - (top_k + 1)·B`` (llama_mem.py)."""
  n = train_len - train_len % block_size - (top_k + 1) * block_size
  if n <= 0:
    raise ValueError(f"top_k={top_k} is too large for train_len={train_len}, block_size={block_size}")
  return n


def _forward_chunk(graphdef, state, caches, start, tokens, *, top_k, selection):
  model = nnx.merge(graphdef, state)
  h = model.embed(tokens)
  new = []
  for block, cache in zip(model.blocks, caches):
    a, cache = block.attn.retrieval_step(block.attn_norm(h), cache, start, top_k=top_k, selection=selection)
    h = h + a
    h = h + block.mlp(block.mlp_norm(h))
    new.append(cache)
  h = model.final_norm(h)
  logits = model.embed.attend(h) if model.head is None else model.head(h)
  return logits.astype(jnp.float32), tuple(new)


class LandmarkRunner:
  """Scores or greedily decodes long contexts with landmark retrieval.

  Args:
    model: a DecoderLM whose layers are all landmark attention.
    chunk_len: tokens (landmarks included) per chunk; see :func:`max_chunk_len`.
    top_k, cache_blocks, selection: override the layers' config defaults.
  """

  def __init__(self, model, *, chunk_len: int, top_k: int | None = None, cache_blocks: int | None = None,
               selection: str | None = None):
    attns = [block.attn for block in model.blocks]
    if not all(isinstance(a, LandmarkAttention) for a in attns):
      raise ValueError("LandmarkRunner needs a model whose every layer is LandmarkAttention")
    keys = {(a.cfg.block_size, a.cfg.landmark_id) for a in attns}
    if len(keys) != 1:
      raise ValueError(f"all landmark layers must share block_size and landmark_id; got {sorted(keys)}")
    if chunk_len < 1:
      raise ValueError(f"chunk_len must be positive; got {chunk_len}")
    (self.block_size, self.landmark_id), = keys
    cfg = attns[0].cfg
    self.chunk_len = chunk_len
    self.cache_blocks = cache_blocks or cfg.cache_blocks
    self.top_k = top_k or cfg.top_k
    if self.top_k > self.cache_blocks:
      raise ValueError(f"top_k ({self.top_k}) exceeds cache_blocks ({self.cache_blocks})")
    self._attns = attns
    graphdef, self._state = nnx.split(model)
    self._step = jax.jit(functools.partial(_forward_chunk, graphdef, top_k=self.top_k,
                                           selection=selection or cfg.selection))

  def init(self, batch: int):
    """Empty per-layer caches and stream position 0."""
    return tuple(a.init_cache(batch, self.cache_blocks) for a in self._attns), 0

  def feed(self, state, tokens):
    """Feeds stream tokens (landmarks included, at positions ``p % B == B - 1``); returns (logits, state)."""
    caches, start = state
    tokens = jnp.asarray(tokens, jnp.int32)
    is_lm = (start + np.arange(tokens.shape[1])) % self.block_size == self.block_size - 1
    if not np.array_equal(np.asarray(tokens == self.landmark_id), np.broadcast_to(is_lm, tokens.shape)):
      raise ValueError("landmark tokens must sit exactly at stream positions p % block_size == block_size - 1")
    logits, caches = self._step(self._state, caches, jnp.int32(start), tokens)
    return logits, (caches, start + tokens.shape[1])

  def _feed_stream(self, state, stream):
    outs = []
    for i in range(0, stream.shape[1], self.chunk_len):
      logits, state = self.feed(state, stream[:, i:i + self.chunk_len])
      outs.append(logits)
    return jnp.concatenate(outs, axis=1), state

  def score(self, tokens) -> jax.Array:
    """Logits (batch, n, vocab) for plain tokens (batch, n): position t predicts token t + 1."""
    tokens = np.asarray(tokens)
    stream, is_lm = insert_landmarks(tokens, self.landmark_id, self.block_size)
    logits, _ = self._feed_stream(self.init(tokens.shape[0]), stream)
    return logits[:, ~is_lm]

  def generate(self, prompt, max_new_tokens: int) -> np.ndarray:
    """Greedy continuation (batch, max_new_tokens) of plain-token prompts (batch, n); landmarks are inserted
    here and never generated."""
    prompt = np.asarray(prompt)
    stream, is_lm = insert_landmarks(prompt, self.landmark_id, self.block_size)
    logits, state = self._feed_stream(self.init(prompt.shape[0]), stream)
    last = logits[:, np.flatnonzero(~is_lm)[-1]]
    out = []
    for _ in range(max_new_tokens):
      tok = np.asarray(jnp.argmax(last.at[:, self.landmark_id].set(-jnp.inf), axis=-1)).astype(np.int32)[:, None]
      out.append(tok)
      logits, state = self.feed(state, tok)
      last = logits[:, -1]
      if state[1] % self.block_size == self.block_size - 1:  # close the block
        _, state = self.feed(state, np.full_like(tok, self.landmark_id))
    return np.concatenate(out, axis=1)
