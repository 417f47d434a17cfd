"""Typed, frozen configuration of attention layers. gin binds these fields; library code never imports gin."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from attnlab.attention.core import IMPLS

GATES = (None, "elementwise", "headwise")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Dot-product attention with a pluggable score function and the sink controls of the sink study.

  Variants (landmark, CCA, lightning, routing, ...) subclass this and register a module for the subclass
  (:func:`attnlab.attention.registry.register_attention`).
  """

  num_heads: int = 4
  num_kv_heads: int | None = None  # None -> num_heads (MHA); fewer -> GQA
  head_dim: int | None = None  # None -> d_model // num_heads
  score: str = "softmax"
  score_params: Any = ()  # mapping or (name, value) pairs, e.g. {"b": 0.0, "normalize": True}
  causal: bool = True
  rope: bool = True  # False -> NoPE
  rope_base: float = 10_000.0
  qk_norm: bool = False  # RMSNorm over head_dim of q and k (Dehghani et al. 2023)
  sink_logit: bool = False  # learnable per-head sink logit (gpt-oss); softmax only
  sink_logit_init: float = 0.0
  sink_token: bool = False  # one learned (key, value) pair prepended to the keys (StreamingLLM placeholder sink)
  key_bias: bool = False  # learned key slot with value fixed at 0 (Gu et al.'s "sink as key bias")
  value_bias: bool = False  # learned value slot (with a zero key unless key_bias/sink_token)
  gate: str | None = None  # sigmoid output gate: "elementwise" or "headwise" (Qiu et al. 2025)
  use_bias: bool = False  # biases in the q/k/v/o projections
  IMPLS: ClassVar[tuple[str, ...]] = IMPLS  # the implementations this kind of layer offers (subclasses override)
  impl: str = "xla"  # attend() implementation: "xla" (dense), "pallas" (flash kernel), "auto" (kernel on GPU/TPU)

  def __post_init__(self):
    params = self.score_params
    if isinstance(params, Mapping):
      params = tuple(sorted(params.items()))
    object.__setattr__(self, "score_params", tuple(tuple(p) for p in params))
    if self.impl not in self.IMPLS:
      raise ValueError(f"impl must be one of {self.IMPLS}; got {self.impl!r}")
    if self.gate not in GATES:
      raise ValueError(f"gate must be one of {GATES}; got {self.gate!r}")
    if self.num_heads <= 0:
      raise ValueError(f"num_heads must be positive; got {self.num_heads}")
    if self.kv_heads <= 0 or self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def score_kwargs(self) -> dict[str, Any]:
    return dict(self.score_params)

  @property
  def has_sink_slot(self) -> bool:
    return self.sink_token or self.key_bias or self.value_bias

  def for_layer(self, layer: int, num_layers: int) -> AttentionConfig:
    """This config as used by layer ``layer`` (0-based) of a ``num_layers`` stack. Identity here; variants with
    depth-dependent hyperparameters (lightning's per-layer decay) override it."""
    del layer, num_layers
    return self

  def resolved_head_dim(self, d_model: int) -> int:
    if self.head_dim is not None:
      return self.head_dim
    if d_model % self.num_heads:
      raise ValueError(f"d_model ({d_model}) is not divisible by num_heads ({self.num_heads}); set head_dim")
    return d_model // self.num_heads
