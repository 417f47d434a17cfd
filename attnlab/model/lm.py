"""Decoder-only language model: embeddings, pre-norm blocks (attention of any registered kind + MLP), LM head.

    h_0 = E[tokens];  h_{l+1} = h_l' + MLP(Norm(h_l')),  h_l' = h_l + Attn_l(Norm(h_l));  logits = Norm(h_L) W_out

With ``parallel_residual``, ``h_{l+1} = h_l + Attn_l(Norm(h_l)) + MLP(Norm'(h_l))`` (GPT-J / GPT-NeoX).
With ``position_embedding="learned"``, ``h_0 = E[tokens] + P[positions]`` (GPT-2-style absolute positions).

Decoding follows the cache protocol of :mod:`attnlab.attention.cache`, over all layers::

    cache = model.init_cache(batch, max_len, policy="full")          # or "window:W", "sink:S+W"
    logits, cache = model.prefill(prompt, cache=cache)                # (batch, n, vocab): the forward's logits
    logits_t, cache = model.step(token, position=n, cache=cache)      # token (batch,) -> (batch, vocab)

The same embedding (learned positions included), blocks and head as the forward; only attention reads the cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

import attnlab.attention.variants  # noqa: F401  (registers every attention kind)
from attnlab.attention.cache import FULL, CachePolicy, check_position, check_prompt, parse_policy
from attnlab.attention.registry import attention_module_for
from attnlab.layers import MLP, apply_2d, embed_init, kernel_init, make_norm
from attnlab.model.config import ModelConfig
from attnlab.parallel.sharding import constrain


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs, dtype):
    att_cfg = cfg.layer_attention(layer)
    norm = dict(rngs=rngs, dtype=dtype, fast_variance=cfg.norm_fast_variance)
    self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, **norm)
    self.attn = attention_module_for(att_cfg)(att_cfg, cfg.d_model, rngs=rngs, init=cfg.init, dtype=dtype)
    self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, **norm)
    self.mlp = MLP(cfg.d_model, cfg.resolved_mlp_dim, cfg.mlp_activation, init=cfg.init, rngs=rngs, dtype=dtype,
                   use_bias=cfg.mlp_bias)
    self.parallel_residual = cfg.parallel_residual

  def __call__(self, h, *, tokens, positions, segment_ids, return_internals):
    # Token-aware attention (landmark, meta tokens) declares ``needs_tokens`` and receives the input ids.
    extra = {"tokens": tokens} if getattr(self.attn, "needs_tokens", False) else {}
    a, aux = self.attn(self.attn_norm(h), positions=positions, segment_ids=segment_ids,
                       return_internals=return_internals, **extra)
    return self.residual(h, a), aux

  def decode(self, method: str, h, *, tokens, cache, **where):
    """``prefill`` (``where = {positions}``) or ``step`` (``where = {position}``) of this block."""
    extra = {"tokens": tokens} if getattr(self.attn, "needs_tokens", False) else {}
    a, cache = getattr(self.attn, method)(self.attn_norm(h), cache=cache, **where, **extra)
    return self.residual(h, a), cache

  def residual(self, h, a):
    """The block's output from its input ``h`` and attention output ``a`` (sequential or parallel residual)."""
    if self.parallel_residual:
      return h + a + self.mlp(self.mlp_norm(h))
    h = h + a
    return h + self.mlp(self.mlp_norm(h))


@struct.dataclass
class LMCache:
  """The caches of every layer (``layers``, one pytree each) and the number of tokens seen (``length``).
  Static: ``max_len`` and the :class:`CachePolicy`."""

  layers: tuple
  length: jax.Array
  max_len: int = struct.field(pytree_node=False)
  policy: CachePolicy = struct.field(pytree_node=False, default=FULL)

  def logical_axes(self) -> LMCache:
    """Same structure, a PartitionSpec of logical axis names per array (see :mod:`attnlab.parallel.sharding`)."""
    return self.replace(layers=tuple(c.logical_axes() for c in self.layers), length=P())


class DecoderLM(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, embedding_init=embed_init(cfg.init), dtype=dtype,
                           rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_seq_len, cfg.d_model, embedding_init=embed_init(cfg.init, (None, "embed")), dtype=dtype,
                               rngs=rngs) if cfg.position_embedding == "learned" else None
    self.blocks = nnx.List([Block(cfg, i, rngs=rngs, dtype=dtype) for i in range(cfg.num_layers)])
    self.final_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, rngs=rngs, dtype=dtype,
                                fast_variance=cfg.norm_fast_variance)
    self.head = None if cfg.tie_embeddings else nnx.Linear(
        cfg.d_model, cfg.vocab_size, use_bias=False, kernel_init=kernel_init(cfg.init, ("embed", "vocab")), dtype=dtype,
        rngs=rngs)

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, return_aux: bool = False, return_internals: bool = False):
    """tokens: (batch, seq) int. Returns float32 logits (batch, seq, vocab), or ``(logits, aux)`` when
    ``return_aux``/``return_internals``: ``aux["aux_loss"]`` sums the layers' auxiliary losses and, with
    ``return_internals``, ``aux["hidden"]`` (num_layers + 1 residual states) and ``aux["layers"]`` (each layer's
    attention internals: weights, sink_mass, queries, keys, values)."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (batch, seq); got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > self.cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's max_seq_len {self.cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = self.embed(tokens)
    if self.pos_embed is not None:
      h = h + self.pos_embed(positions)
    h = constrain(h, ("batch", "seq", None))  # logical activation axes (no-op without a mesh)
    aux_loss = jnp.zeros((), jnp.float32)
    hidden, layers = [h], []
    for block in self.blocks:
      h, aux = block(h, tokens=tokens, positions=positions, segment_ids=segment_ids, return_internals=return_internals)
      h = constrain(h, ("batch", "seq", None))
      aux_loss = aux_loss + aux.pop("aux_loss", 0.0)
      if return_internals:
        hidden.append(h)
        layers.append(aux)
    h = self.final_norm(h)
    logits = self.embed.attend(h) if self.head is None else apply_2d(self.head, h)
    logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
    if not (return_aux or return_internals):
      return logits
    out: dict[str, Any] = {"aux_loss": aux_loss}
    if return_internals:
      out.update(hidden=hidden, layers=layers)
    return logits, out

  # --- decoding: the cache protocol (attnlab.attention.cache) ---

  def init_cache(self, batch: int, max_len: int, *, policy: str | CachePolicy = FULL) -> LMCache:
    """An empty cache for ``batch`` streams of at most ``max_len`` positions under ``policy`` ("full",
    "window:W", "sink:S+W" or a :class:`CachePolicy`); ValueError if a layer cannot serve the policy. With
    RoPE/NoPE ``max_len`` may exceed ``max_seq_len`` (length extrapolation: streaming, landmark retrieval); with
    learned position embeddings it may not."""
    policy = parse_policy(policy)
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f"max_len must be a positive int; got {max_len!r}")
    if self.pos_embed is not None:
      if policy.n_sink and policy.pos_shift:
        raise ValueError(f"cache_policy={policy.name!r} re-positions cached tokens, which this model cannot: it "
                         f"adds learned absolute position embeddings (position_embedding='learned') to its inputs")
    if self.pos_embed is not None and max_len > self.cfg.max_seq_len:
      raise ValueError(f"max_len={max_len} exceeds max_seq_len={self.cfg.max_seq_len}, the rows of this model's "
                       f"learned position embeddings")
    layers = []
    for i, block in enumerate(self.blocks):
      if not hasattr(block.attn, "init_cache"):
        raise ValueError(f"layer {i} ({type(block.attn).__name__}) has no decode cache")
      try:
        layers.append(block.attn.init_cache(batch, max_len, policy=policy))
      except ValueError as e:
        raise ValueError(f"layer {i}: {e}") from None
    return LMCache(tuple(layers), jnp.zeros((), jnp.int32), max_len=max_len, policy=policy)

  def _embed(self, tokens, positions):
    h = self.embed(tokens)
    if self.pos_embed is not None:
      h = h + self.pos_embed(positions)
    return h

  def _logits(self, h):
    h = self.final_norm(h)
    logits = self.embed.attend(h) if self.head is None else apply_2d(self.head, h)
    return logits.astype(jnp.float32)

  def prefill(self, tokens: jax.Array, *, cache: LMCache, positions: jax.Array | None = None):
    """The prompt ``tokens`` (batch, n) into an empty ``cache``: ``(logits (batch, n, vocab), cache)``, the
    forward's logits."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be (batch, seq); got shape {tuple(tokens.shape)}")
    check_prompt(tokens.shape[1], cache.max_len)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    h = self._embed(tokens, positions)
    new = []
    for block, c in zip(self.blocks, cache.layers):
      h, c = block.decode("prefill", h, tokens=tokens, cache=c, positions=positions)
      new.append(c)
    length = jnp.asarray(positions[0, -1] + 1, jnp.int32)
    return self._logits(h), cache.replace(layers=tuple(new), length=length)

  def step(self, token: jax.Array, *, position, cache: LMCache):
    """One token per stream, ``token`` (batch,) or (batch, 1), at ``position`` (int (), normally
    ``cache.length``): ``(logits (batch, vocab), cache)``."""
    check_position(position, cache.max_len)
    tokens = token.reshape(-1, 1)
    p = jnp.asarray(position, jnp.int32).reshape(())
    h = self._embed(tokens, jnp.broadcast_to(p, tokens.shape))
    new = []
    for block, c in zip(self.blocks, cache.layers):
      h, c = block.decode("step", h, tokens=tokens, cache=c, position=p)
      new.append(c)
    return self._logits(h)[:, 0], cache.replace(layers=tuple(new), length=p + 1)
