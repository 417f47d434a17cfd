"""Autoregressive generation with any :class:`attnlab.DecoderLM` through its cache protocol.

    cache = model.init_cache(batch, n + N, policy)     ->  logits, cache = model.prefill(prompt, cache=cache)
    x_{t+1} ~ sample(logits_t / temperature, top_k)    ->  logits_{t+1}, cache = model.step(x_{t+1}, position=t+1)

The prompt is prefilled in one jitted call; each new token runs one jitted step (a Python loop over the same
compiled step: no per-token recompilation; :data:`TRACE_COUNTS` counts traces). ``temperature = 0`` is greedy.
Models with landmark layers (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length
for Transformers", arXiv 2305.16300) take plain prompts: a landmark is inserted after every ``block_size - 1``
tokens, fed through the cache and never sampled nor returned.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnlab.attention.cache import CachePolicy, parse_policy
from attnlab.attention.special_tokens import LandmarkTokens
from attnlab.data.landmark import insert_landmarks
from attnlab.parallel.sharding import DEFAULT_RULES, fit_spec, logical_to_spec

TRACE_COUNTS: collections.Counter = collections.Counter()  # "prefill"/"step": how often each was traced


def cache_shardings(cache, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding tree for a cache (``LMCache`` or a layer's), from its ``logical_axes()`` and the mesh rules of
  :mod:`attnlab.parallel.sharding` (dimensions the mesh does not divide are replicated)."""
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, fit_spec(logical_to_spec(tuple(spec), rules),
                                                                   x.shape, mesh)),
                      cache.logical_axes(), cache, is_leaf=lambda s: isinstance(s, P))


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None,
           banned: int | None = None) -> jax.Array:
  """Next tokens (batch,) int32 from logits (batch, vocab): argmax when ``temperature == 0``, else a draw from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` largest; ``banned`` is never drawn."""
  if banned is not None:
    logits = logits.at[:, banned].set(-jnp.inf)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _prefill(graphdef, state, prompt, key, max_len, policy, sampling, banned):
  TRACE_COUNTS["prefill"] += 1
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt.shape[0], max_len, policy=policy)
  logits, cache = model.prefill(prompt, cache=cache)
  temperature, top_k = sampling
  return sample(logits[:, -1], key, temperature=temperature, top_k=top_k, banned=banned), cache


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _step(graphdef, state, cache, token, position, root, sampling, banned):
  TRACE_COUNTS["step"] += 1
  model = nnx.merge(graphdef, state)
  logits, cache = model.step(token, position=position, cache=cache)
  temperature, top_k = sampling
  key = jax.random.fold_in(root, position)
  return sample(logits, key, temperature=temperature, top_k=top_k, banned=banned), cache


def _landmarks(model) -> LandmarkTokens | None:
  specs = {blk.attn.cfg.special_tokens() for blk in model.blocks}
  marks = {s for s in specs if isinstance(s, LandmarkTokens)}
  if len(marks) > 1:
    raise ValueError(f"the landmark layers disagree on block_size/landmark_id: {sorted(map(str, marks))}")
  return next(iter(marks), None)


def generate(model, prompt, max_new_tokens: int, *, cache_policy: str | CachePolicy = "full",
             temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
             max_len: int | None = None) -> jax.Array:
  """``max_new_tokens`` tokens (batch, max_new_tokens) continuing ``prompt`` (batch, n) or (n,).

  Args:
    model: a :class:`attnlab.DecoderLM` (call ``model.eval()`` first for layers with a train/eval mode).
    cache_policy: "full", "window:W" or "sink:S+W" (StreamingLLM, positions shifted) or a ``CachePolicy``.
    temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
    top_k: sample among the ``top_k`` most likely tokens (None: all).
    seed: the draw at position p uses ``fold_in(key(seed), p)``: reproducible, independent of batching.
    max_len: the cache's max_len (default: the stream length, prompt + new tokens + landmarks).
  """
  policy = parse_policy(cache_policy)
  prompt = np.asarray(prompt)
  if prompt.ndim == 1:
    prompt = prompt[None]
  if prompt.ndim != 2 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"prompt must be (batch, n >= 1) token ids; got shape {prompt.shape}, dtype {prompt.dtype}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
  if not temperature >= 0.0:
    raise ValueError(f"temperature must be >= 0; got {temperature!r}")
  vocab = model.cfg.vocab_size
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab):
    raise ValueError(f"top_k must be None or an int in [1, vocab_size={vocab}]; got {top_k!r}")
  marks = _landmarks(model)
  banned = None
  if marks is not None:
    prompt, _ = insert_landmarks(prompt, marks.landmark_id, marks.block_size)
    banned = marks.landmark_id
  n = prompt.shape[1]
  is_mark = (lambda p: p % marks.block_size == marks.block_size - 1) if marks else (lambda p: False)
  need = n  # positions the stream occupies: the prompt, then each fed token (and landmark)
  for _ in range(max_new_tokens - 1):
    need += 1 + is_mark(need)
  max_len = need if max_len is None else max_len
  if need > max_len:
    raise ValueError(f"the prompt ({n} tokens) and max_new_tokens={max_new_tokens} need {need} positions but "
                     f"max_len={max_len}")
  graphdef, state = nnx.split(model)
  sampling = (float(temperature), top_k)
  root = jax.random.key(seed)
  tok, cache = _prefill(graphdef, state, jnp.asarray(prompt, jnp.int32), jax.random.fold_in(root, n - 1),
                        max_len, policy, sampling, banned)
  out, pos = [tok], n
  for _ in range(max_new_tokens - 1):
    if is_mark(pos):  # close the block: feed the landmark, discard its prediction
      _, cache = _step(graphdef, state, cache, jnp.full_like(tok, banned), jnp.int32(pos), root, sampling,
                       banned)
      pos += 1
    tok, cache = _step(graphdef, state, cache, tok, jnp.int32(pos), root, sampling, banned)
    out.append(tok)
    pos += 1
  return jnp.stack(out, axis=1)
