"""Chunk-by-chunk landmark inference for a :class:`attnlab.model.lm.DecoderLM` (scoring and greedy decoding).

Mohtashami & Jaggi 2023: the context is fed in chunks; every layer attends over
``[top-k retrieved blocks | incomplete block | chunk]`` (:func:`attnlab.attention.landmark.retrieval_attention`)
and caches complete blocks. The runner inserts a landmark after every ``block_size - 1`` real tokens itself and
drops the landmark positions from its outputs, so callers (passkey / length-extrapolation evals) pass plain
token ids. Every layer of the model must be :class:`LandmarkAttention` with the same block size and landmark id.
Each chunk runs through the model's own decode path (``DecoderLM.prefill`` from the current cache, the protocol of
:mod:`attnlab.attention.cache`), so learned position embeddings and every other part of the forward apply.
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


STREAM_MAX_LEN = 2 ** 30  # retrieval caches have a fixed size; positions are only bounded by RoPE's range


def _forward_chunk(graphdef, state, cache, start, tokens):
  model = nnx.merge(graphdef, state)
  positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
  return model.prefill(tokens, positions=positions, cache=cache)


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
    if model.pos_embed is not None and chunk_len > model.cfg.max_seq_len:
      raise ValueError(f"chunk_len={chunk_len} exceeds max_seq_len={model.cfg.max_seq_len} of learned positions")
    self.selection = selection or cfg.selection
    self._model = model
    self._max_len = model.cfg.max_seq_len if model.pos_embed is not None else STREAM_MAX_LEN
    graphdef, self._state = nnx.split(model)
    self._step = jax.jit(functools.partial(_forward_chunk, graphdef))

  def init(self, batch: int):
    """An empty model cache (the layers' retrieval caches) and stream position 0."""
    cache = self._model.init_cache(batch, self._max_len)
    layers = tuple(b.attn.init_cache(batch, self._max_len, top_k=self.top_k, cache_blocks=self.cache_blocks,
                                     selection=self.selection) for b in self._model.blocks)
    return cache.replace(layers=layers), 0

  def feed(self, state, tokens):
    """Feeds stream tokens (landmarks included, at positions ``p % B == B - 1``); returns (logits, state)."""
    caches, start = state
    tokens = jnp.asarray(tokens, jnp.int32)
    is_lm = (start + np.arange(tokens.shape[1])) % self.block_size == self.block_size - 1
    if not np.array_equal(np.asarray(tokens == self.landmark_id), np.broadcast_to(is_lm, tokens.shape)):
      raise ValueError("landmark tokens must sit exactly at stream positions p % block_size == block_size - 1")
    if start + tokens.shape[1] > self._max_len:
      raise ValueError(f"the stream reaches position {start + tokens.shape[1]} > max_seq_len={self._max_len} of the "
                       f"model's learned position embeddings")
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
