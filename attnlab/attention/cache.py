"""The cache protocol of attention layers and the cache policies (full, sliding window, StreamingLLM sink + window).

Every attention module (and :class:`attnlab.model.lm.DecoderLM` over its layers) decodes through three methods::

    cache = layer.init_cache(batch, max_len, policy=FULL)             # an empty cache: a pytree of arrays
    y, cache = layer.prefill(x, positions=positions, cache=cache)     # x (batch, n, d_model): the prompt, one call
    y, cache = layer.step(x_t, position=position, cache=cache)        # x_t (batch, 1, d_model), position: int ()

``prefill`` starts from an EMPTY cache (the prompt's first token is at ``positions[:, 0]``, normally 0) and returns
exactly the full forward's outputs on the prompt; ``step`` appends one token at ``position`` (the number of tokens
seen so far) and attends to the cache. ``max_len`` bounds the positions the cache serves. Layers that read the
input ids (landmark, meta tokens) also take ``tokens=`` (the ids of ``x``). Caches are ``flax.struct`` dataclasses
(jit/scan arguments, checkpointable with any pytree checkpointer); ``cache.logical_axes()`` returns the same
structure with a :class:`jax.sharding.PartitionSpec` of logical axis names per array, which
:func:`attnlab.inference.cache_shardings` maps to a mesh with :mod:`attnlab.parallel.sharding`'s rules.

A :class:`CachePolicy` says which tokens a softmax-family layer keeps (``parse_policy`` reads the strings
"full", "window:W", "sink:S+W"):

* full: every token up to ``max_len`` (a layer with ``AttentionConfig.window = W`` keeps a ring of W).
* window W: the W most recent tokens, the current one included (a ring buffer); queries see exactly those.
* sink S + W: the first S tokens plus the W most recent (Xiao et al. 2024, "Efficient Streaming Language Models
  with Attention Sinks", arXiv 2309.17453). With ``pos_shift`` (StreamingLLM's reference behaviour) keys are
  cached before RoPE and re-rotated at every step by their rank in the cache ``0..n-1`` while the query takes
  rank ``n-1``; without it, every key keeps its original position.

Sliding-window visibility (Beltagy et al. 2020, "Longformer", arXiv 2004.05150; Mistral 7B, arXiv 2310.06825):
query i sees keys ``j`` with ``i - W < j <= i`` (plus the S sink tokens ``j < S`` under a sink policy).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class CachePolicy:
  """Which tokens a layer's cache keeps: ``n_sink`` first tokens + the ``window`` most recent ones (``window``
  None: all of them, up to ``max_len``). ``pos_shift``: RoPE positions inside the cache (see module docstring)."""

  n_sink: int = 0
  window: int | None = None
  pos_shift: bool = True

  def __post_init__(self):
    if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
      raise ValueError(f"n_sink must be an int >= 0; got {self.n_sink!r}")
    if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                    or self.window < 1):
      raise ValueError(f"window must be >= 1 (it holds the current token); got {self.window!r}")
    if self.n_sink and self.window is None:
      raise ValueError(f"a cache policy with n_sink={self.n_sink} needs a window")

  @property
  def is_full(self) -> bool:
    return self.window is None

  @property
  def capacity(self) -> int | None:
    """Slots of the cache (None: one per position up to ``max_len``)."""
    return None if self.window is None else self.n_sink + self.window

  @property
  def name(self) -> str:
    if self.window is None:
      return "full"
    if not self.n_sink:
      return f"window:{self.window}"
    return f"sink:{self.n_sink}+{self.window}" + ("" if self.pos_shift else " (original positions)")


FULL = CachePolicy()
_POLICY_RE = re.compile(r"^(full|window:(\d+)|sink:(\d+)\+(\d+))$")


def parse_policy(spec: str | CachePolicy) -> CachePolicy:
  """``"full"``, ``"window:W"`` or ``"sink:S+W"`` (or a :class:`CachePolicy`, returned as is)."""
  if isinstance(spec, CachePolicy):
    return spec
  m = _POLICY_RE.match(spec.strip()) if isinstance(spec, str) else None
  if m is None:
    raise ValueError(f"cache_policy must be 'full', 'window:W' or 'sink:S+W' (W >= 1, S >= 0 integers); "
                     f"got {spec!r}")
  if m.group(2) is not None:
    return CachePolicy(0, int(m.group(2)))
  if m.group(3) is not None:
    return CachePolicy(int(m.group(3)), int(m.group(4)))
  return FULL


def check_full_only(policy: CachePolicy, layer: str, reason: str) -> None:
  """ValueError unless ``policy`` is "full" (layers that keep their own state, or need every past token)."""
  if not policy.is_full:
    raise ValueError(f"cache_policy={policy.name!r} cannot serve a {layer} layer ({reason}); use "
                     f"cache_policy='full'")


def check_prompt(n: int, max_len: int) -> None:
  if n > max_len:
    raise ValueError(f"the prompt has {n} tokens but the cache's max_len is {max_len}: init_cache with a larger "
                     f"max_len")


def check_position(position, max_len: int) -> None:
  """ValueError when a concrete ``position`` is past ``max_len`` (traced positions are not checked)."""
  if isinstance(position, jax.core.Tracer):
    return
  p = int(jnp.asarray(position).reshape(-1)[0])
  if not 0 <= p < max_len:
    raise ValueError(f"step position {p} is outside the cache (max_len={max_len})")


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None, n_sink: int = 0) -> jax.Array:
  """(…, q, k) boolean: key ``k_pos`` is visible to query ``q_pos`` (causal, within ``window``, or a sink).

  Used with an explicit mask by the dense forward of windowed layers and by the caches until ``attend`` takes
  ``window=`` itself."""
  q, k = q_pos[..., :, None], k_pos[..., None, :]
  ok = (k >= 0) & (k <= q)
  if window is not None:
    ok = ok & ((k > q - window) | (k < n_sink))
  return ok


@struct.dataclass
class KVCache:
  """Dense key/value cache of one softmax-family layer (every score function, GQA, sink controls).

  ``keys``/``values``: (batch, slots, kv_heads, head_dim); ``positions``: (slots,) the original position held by
  each slot (-1 = empty); ``length``: () tokens seen. Keys are stored after RoPE (``rotated``) unless the policy
  re-positions them (StreamingLLM's ``pos_shift`` with sinks). Static: ``max_len``, ``n_sink``, ``window``,
  ``rotated``. Slot of position p: ``p`` if ``p < n_sink`` else ``n_sink + (p - n_sink) % window`` (a ring).
  """

  keys: jax.Array
  values: jax.Array
  positions: jax.Array
  length: jax.Array
  max_len: int = struct.field(pytree_node=False)
  n_sink: int = struct.field(pytree_node=False, default=0)
  window: int | None = struct.field(pytree_node=False, default=None)
  rotated: bool = struct.field(pytree_node=False, default=True)

  @classmethod
  def empty(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, *, n_sink: int = 0,
            window: int | None = None, rotated: bool = True, dtype=jnp.float32) -> KVCache:
    slots = max_len if window is None else min(n_sink + window, max_len)
    shape = (batch, slots, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((slots,), -1, jnp.int32),
               jnp.zeros((), jnp.int32), max_len=max_len, n_sink=n_sink, window=window, rotated=rotated)

  @property
  def slots(self) -> int:
    return self.keys.shape[1]

  def logical_axes(self) -> KVCache:
    kv = P("batch", "seq", "kv_heads", None)
    return self.replace(keys=kv, values=kv, positions=P(None), length=P())

  def slot_of(self, pos: jax.Array) -> jax.Array:
    if self.window is None:
      return pos
    s = self.n_sink
    return jnp.where(pos < s, pos, s + (pos - s) % self.window)

  def write(self, k: jax.Array, v: jax.Array, pos: jax.Array) -> KVCache:
    """Writes a chunk (k, v: (batch, t, kv_heads, head_dim), pos: (t,) increasing); in a ring only the tokens
    that survive the chunk are written (so no two writes hit one slot)."""
    last = pos[-1]
    keep = (pos >= 0) & (pos < self.max_len)
    if self.window is not None:
      keep = keep & ((pos < self.n_sink) | (pos > last - self.window))
    idx = jnp.where(keep, self.slot_of(pos), self.slots)  # out of range -> dropped
    return self.replace(keys=self.keys.at[:, idx].set(k.astype(self.keys.dtype), mode="drop"),
                        values=self.values.at[:, idx].set(v.astype(self.values.dtype), mode="drop"),
                        positions=self.positions.at[idx].set(pos.astype(jnp.int32), mode="drop"),
                        length=jnp.maximum(self.length, last + 1).astype(jnp.int32))

  def shifted_positions(self, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key RoPE positions (slots,), query position ()) under ``pos_shift`` after writing position ``p``: the
    rank of each kept token in the cache."""
    s, w = self.n_sink, self.window
    start = jnp.maximum(s, p - w + 1)
    ranks = jnp.where(self.positions < s, self.positions, self.positions - start + s)
    return ranks, jnp.minimum(p, s + w - 1)
