"""Decoder-only language model: embeddings, pre-norm blocks (attention of any registered kind + MLP), LM head.

    h_0 = E[tokens];  h_{l+1} = h_l' + MLP(Norm(h_l')),  h_l' = h_l + Attn_l(Norm(h_l));  logits = Norm(h_L) W_out

With ``parallel_residual``, ``h_{l+1} = h_l + Attn_l(Norm(h_l)) + MLP(Norm'(h_l))`` (GPT-J / GPT-NeoX).
With ``position_embedding="learned"``, ``h_0 = E[tokens] + P[positions]`` (GPT-2-style absolute positions).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

import attnlab.attention.variants  # noqa: F401  (registers every attention kind)
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
    if self.parallel_residual:
      return h + a + self.mlp(self.mlp_norm(h)), aux
    h = h + a
    return h + self.mlp(self.mlp_norm(h)), aux


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
