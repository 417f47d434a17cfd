"""Landmark attention layer (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length
for Transformers", NeurIPS 2023).

Training: the input stream carries a landmark token (``landmark_id``) after every ``block_size - 1`` tokens
(:mod:`attnlab.data.landmark`); the layer finds them in ``tokens`` and applies the grouped softmax
(:func:`attnlab.attention.landmark.landmark_attention`): each query attends to its own block's tokens and to the
landmarks of past blocks, and a past block's tokens get ``P(landmark) × in-block softmax``. Any landmark layout
works (random window offsets), and without landmarks it is causal softmax attention.

Inference (the protocol of :mod:`attnlab.attention.cache`, policy "full"): the retrieval cache of complete
blocks with top-k retrieval (:func:`attnlab.attention.landmark.retrieval_attention`). ``prefill`` takes a chunk
of any length starting at ``positions[:, 0]`` from any cache state (not only an empty one) and ``step`` one token;
with ``top_k >=`` the number of cached blocks both equal the training forward. Landmark tokens must sit at stream
positions ``p % block_size == block_size - 1``. The chunked long-context driver is
:class:`attnlab.attention.landmark.runner.LandmarkRunner` (over ``DecoderLM.prefill``); ``attnlab.generate``
inserts the landmarks itself.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from attnlab.attention.cache import FULL, CachePolicy, check_full_only, check_position, check_prompt, parse_policy
from attnlab.attention.config import GroupedKV, OutputGateField, QKNorm
from attnlab.attention.landmark.grouped_softmax import landmark_attention
from attnlab.attention.landmark.retrieval import SELECTIONS, LandmarkCache, init_cache, retrieval_attention
from attnlab.attention.registry import register_attention
from attnlab.attention.special_tokens import LandmarkTokens
from attnlab.attention.projections import HeadsOutput, QKVProjection, make_gate
from attnlab.layers import apply_rope


@dataclasses.dataclass(frozen=True)
class LandmarkConfig(OutputGateField, QKNorm, GroupedKV):
  """Landmark attention. ``block_size`` counts the landmark (paper: 50 tokens + 1 landmark = 51).

  ``landmark_id`` must be a valid token id of the LM (e.g. 259 with ``ModelConfig.vocab_size = 260`` for the
  byte vocabulary). ``top_k``, ``cache_blocks`` (cache size limit, in blocks) and ``selection`` are the
  inference defaults (reference: ``cache_topk``, ``mem_cache_size``, ``cache_selection_method``).
  """

  block_size: int = 51
  landmark_id: int = 259
  top_k: int = 4
  cache_blocks: int = 64
  selection: str = "per_token_and_head"

  def __post_init__(self):
    super().__post_init__()
    if self.block_size < 2:
      raise ValueError(f"block_size (landmark included) must be >= 2; got {self.block_size}")
    if not 1 <= self.top_k <= self.cache_blocks:
      raise ValueError(f"need 1 <= top_k <= cache_blocks; got top_k={self.top_k}, cache_blocks={self.cache_blocks}")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}; got {self.selection!r}")

  def special_tokens(self) -> LandmarkTokens:
    """What the data pipeline must interleave into batches for this layer (``DataConfig.special_tokens``)."""
    return LandmarkTokens(block_size=self.block_size, landmark_id=self.landmark_id)


class LandmarkAttention(HeadsOutput, nnx.Module):
  needs_tokens = True  # attnlab.model.lm.Block passes the input ids (landmarks are found by id)

  def __init__(self, cfg: LandmarkConfig, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32):
    self.cfg = cfg
    # RoPE is applied here, not in the projection: inference caches keys before RoPE.
    self.qkv = QKVProjection.for_config(cfg, d_model, rope=False, init=init, rngs=rngs, dtype=dtype)
    self.head_dim = hd = self.qkv.head_dim
    self.init_output(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)
    self.gate = make_gate(cfg, d_model, hd, init=init, rngs=rngs, dtype=dtype)

  def __call__(self, x, *, positions, segment_ids=None, return_internals=False, tokens=None):
    if tokens is None:
      raise ValueError("LandmarkAttention needs the input token ids (tokens=...) to find the landmarks")
    if tokens.shape != x.shape[:2]:
      raise ValueError(f"tokens must be (batch, seq) = {x.shape[:2]}; got {tuple(tokens.shape)}")
    cfg = self.cfg
    q, k, v = self.qkv(x, positions)
    if cfg.rope:
      q, k = apply_rope(q, positions, cfg.rope_base), apply_rope(k, positions, cfg.rope_base)
    is_landmark = tokens == cfg.landmark_id
    o, w = landmark_attention(q, k, v, is_landmark, segment_ids=segment_ids, return_weights=True)
    y = self.output(x, o)
    aux = {}
    if return_internals:
      aux = dict(weights=w, sink_mass=jnp.zeros(w.shape[:-1], w.dtype), queries=q, keys=k, values=v,
                 is_landmark=is_landmark)
    return y, aux

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL, top_k: int | None = None,
                 cache_blocks: int | None = None, selection: str | None = None,
                 dtype=jnp.float32) -> LandmarkLayerCache:
    """An empty retrieval cache; ``top_k``, ``cache_blocks``, ``selection`` override the config's defaults."""
    check_full_only(parse_policy(policy), "landmark", "it keeps its own retrieval cache")
    cfg = self.cfg
    cache_blocks = cache_blocks or cfg.cache_blocks
    top_k = top_k or cfg.top_k
    if not 1 <= top_k <= cache_blocks:
      raise ValueError(f"top_k ({top_k}) must be in [1, cache_blocks={cache_blocks}]")
    inner = init_cache(batch, cache_blocks, cfg.block_size, cfg.kv_heads, self.head_dim, dtype)
    return LandmarkLayerCache(inner, max_len=max_len, top_k=top_k, selection=selection or cfg.selection)

  def _chunk(self, x, start, cache: LandmarkLayerCache):
    cfg = self.cfg
    q, k, v = self.qkv(x, None)
    o, inner = retrieval_attention(q, k, v, cache.inner, start, top_k=cache.top_k, selection=cache.selection,
                                   rope_base=cfg.rope_base if cfg.rope else None)
    return self.output(x, o), cache.replace(inner=inner)

  def prefill(self, x, *, positions, cache: LandmarkLayerCache, tokens=None):
    """A chunk x (batch, T, d_model) at stream positions ``positions`` (batch, T) (consecutive): ``(y, cache)``."""
    del tokens  # landmarks are located by position (p % block_size == block_size - 1)
    check_prompt(x.shape[1], cache.max_len)
    return self._chunk(x, positions[0, 0], cache)

  def step(self, x, *, position, cache: LandmarkLayerCache, tokens=None):
    """One token (batch, 1, d_model) at ``position``: ``(y, cache)``."""
    del tokens
    check_position(position, cache.max_len)
    return self._chunk(x, jnp.asarray(position, jnp.int32).reshape(()), cache)


@struct.dataclass
class LandmarkLayerCache:
  """:class:`LandmarkCache` (ring of complete blocks + the incomplete tail) with static ``max_len``, ``top_k``
  and ``selection``."""

  inner: LandmarkCache
  max_len: int = struct.field(pytree_node=False)
  top_k: int = struct.field(pytree_node=False, default=4)
  selection: str = struct.field(pytree_node=False, default="per_token_and_head")

  def logical_axes(self) -> LandmarkLayerCache:
    blocks, tail = P("batch", None, None, "kv_heads", None), P("batch", None, "kv_heads", None)
    return self.replace(inner=LandmarkCache(blocks, blocks, tail, tail))


register_attention("landmark", LandmarkConfig)(LandmarkAttention)
