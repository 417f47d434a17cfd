"""Typed, frozen configuration of attention layers. gin binds these fields; library code never imports gin.

:class:`BaseAttentionConfig` holds what every attention layer has (heads, head size, RoPE, projection biases, the
implementation); field groups that only some layers have are small dataclass mixins (:class:`GroupedKV`,
:class:`QKNorm`, :class:`ScoreFields`, :class:`SinkLogit`, :class:`OutputGateField`). A variant's config lists
the mixins it supports, so a field it does not have is a gin/constructor error, never silently ignored.
:class:`AttentionConfig` is the standard dot-product layer with every sink control of the sink study.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

from attnlab import fields
from attnlab.attention.dispatch import implementations
from attnlab.ops.scores import get_score
from attnlab.layers import check_rope_scaling

GATES = (None, "elementwise", "headwise")
# Sequence length n of sigmoid's default bias b = -log n when neither ``b`` nor ``ScoreFields.bias_len`` is set
# (the default ModelConfig.max_seq_len; the LM fills ``bias_len`` from its own max_seq_len).
DEFAULT_BIAS_LEN = 4096


@dataclasses.dataclass(frozen=True)
class BaseAttentionConfig:
  """What every attention layer has. Variants subclass it (plus the mixins they support) and register a module
  for their config class (:func:`attnlab.attention.registry.register_attention`).

  ``impl`` picks the implementation among ``IMPLS`` (each variant declares its own).
  """

  num_heads: int = 4
  head_dim: int | None = None  # None -> d_model // num_heads
  rope: bool = True  # False -> NoPE
  rope_base: float = 10_000.0
  use_bias: bool = False  # biases in the q/k/v/o projections
  IMPLS: ClassVar[tuple[str, ...]] = ("xla",)
  impl: str = "xla"

  def __post_init__(self):
    owner = type(self).__name__
    fields.integer(owner, "num_heads", self.num_heads)
    fields.integer(owner, "head_dim", self.head_dim, allow_none=True)
    if self.impl not in self.implementations():
      raise ValueError(f"{owner}.impl must be one of {self.implementations()}; got {self.impl!r}")

  def implementations(self) -> tuple[str, ...]:
    return self.IMPLS

  @property
  def kv_heads(self) -> int:
    return self.num_heads

  @property
  def has_sink_slot(self) -> bool:
    """Whether the layer prepends a learned key/value slot (only :class:`AttentionConfig` can)."""
    return False

  def special_tokens(self):
    """What the data pipeline must interleave into this layer's input (:mod:`attnlab.attention.special_tokens`),
    or None. Landmark and meta-token layers return their token spec."""
    return None

  def for_layer(self, layer: int, num_layers: int) -> BaseAttentionConfig:
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


@dataclasses.dataclass(frozen=True)
class GroupedKV(BaseAttentionConfig):
  """Grouped-query attention: ``num_kv_heads`` key/value heads shared by ``num_heads`` query heads."""

  num_kv_heads: int | None = None  # None -> num_heads (MHA); fewer -> GQA

  def __post_init__(self):
    super().__post_init__()
    fields.integer(type(self).__name__, "num_kv_heads", self.num_kv_heads, allow_none=True)
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class QKNorm(BaseAttentionConfig):
  """RMSNorm over head_dim of q and k (Dehghani et al. 2023, "Scaling Vision Transformers to 22B", arXiv
  2302.05442)."""

  qk_norm: bool = False
  qk_norm_eps: float = 1e-6  # epsilon of the q/k RMSNorms


@dataclasses.dataclass(frozen=True)
class QKVBias(BaseAttentionConfig):
  """Biases on the q/k/v projections set apart from ``W_o``'s (Qwen2 has q/k/v biases and none on ``W_o``)."""

  qkv_bias: bool | None = None  # None -> use_bias


@dataclasses.dataclass(frozen=True)
class RopeVariants(BaseAttentionConfig):
  """Partial rotary and frequency scaling of RoPE. ``rope_fraction``: RoPE on the first
  ``int(head_dim * rope_fraction)`` channels of each q/k head, the rest unrotated (GPT-NeoX ``rotary_pct``).
  ``rope_scaling``: a mapping or (name, value) pairs, ``{"type": "linear", "factor": f}`` or ``{"type": "llama3",
  "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``
  (:func:`attnlab.layers.rope_inv_freq`); empty -> plain RoPE."""

  rope_fraction: float = 1.0
  rope_scaling: Any = ()

  def __post_init__(self):
    scaling = self.rope_scaling
    if isinstance(scaling, Mapping):
      scaling = tuple(sorted(scaling.items()))
    try:
      scaling = tuple(sorted(check_rope_scaling(scaling).items()))
    except (TypeError, ValueError) as e:
      raise ValueError(f"{type(self).__name__}.rope_scaling: {e}") from None
    object.__setattr__(self, "rope_scaling", scaling)
    super().__post_init__()
    if not 0.0 < self.rope_fraction <= 1.0:
      raise ValueError(f"{type(self).__name__}.rope_fraction must be in (0, 1]; got {self.rope_fraction!r}")


@dataclasses.dataclass(frozen=True)
class ScoreFields(BaseAttentionConfig):
  """A score function by name (:mod:`attnlab.ops.scores`) and its parameters.

  Sigmoid attention (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
  arXiv 2409.04431) uses ``p_ij = sigma(s_ij + b)`` with ``b = -log n``. Here ``n`` is FIXED by the config,
  never the number of keys of a call: ``b = -log(bias_len)``, where :meth:`attnlab.ModelConfig.layer_attention`
  sets ``bias_len = max_seq_len`` and a layer built alone uses ``DEFAULT_BIAS_LEN`` (4096). So the full forward,
  a prefix of it and every cached decode step use the same ``b`` (as in the authors' code). An explicit
  ``score_params={"b": ...}`` wins.
  """

  score: str = "softmax"
  score_params: Any = ()  # mapping or (name, value) pairs, e.g. {"b": 0.0, "normalize": True}
  bias_len: int | None = None  # n of sigmoid's default b = -log n; None -> the LM's max_seq_len (or 4096)

  def __post_init__(self):
    params = self.score_params
    if isinstance(params, Mapping):
      params = tuple(sorted(params.items()))
    if isinstance(params, str) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in params):
      raise ValueError(f"{type(self).__name__}.score_params must be a mapping or (name, value) pairs; got "
                       f"{self.score_params!r}")
    object.__setattr__(self, "score_params", tuple(tuple(p) for p in params))
    super().__post_init__()
    fields.integer(type(self).__name__, "bias_len", self.bias_len, allow_none=True)
    try:
      get_score(self.score).check_params(self.score_kwargs)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{type(self).__name__}.score: {e}") from None

  @property
  def score_kwargs(self) -> dict[str, Any]:
    """The score parameters of every call of this layer (forward and decode), with sigmoid's ``b`` resolved."""
    params = dict(self.score_params)
    if self.score == "sigmoid" and params.get("b") is None:
      params["b"] = -math.log(self.bias_len or DEFAULT_BIAS_LEN)
    return params

  def with_max_seq_len(self, max_seq_len: int) -> ScoreFields:
    """This config with ``bias_len = max_seq_len`` unless set (called by :class:`attnlab.ModelConfig`)."""
    return self if self.bias_len is not None else dataclasses.replace(self, bias_len=max_seq_len)


@dataclasses.dataclass(frozen=True)
class SinkLogit(ScoreFields):
  """A learnable per-head logit in the softmax denominator (gpt-oss; ``sink_logit_init = 0`` starts as
  softmax-off-by-one)."""

  sink_logit: bool = False
  sink_logit_init: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.sink_logit and not get_score(self.score).supports_sink_logits:
      raise ValueError(f"{type(self).__name__}.sink_logit needs a score with sink logits (softmax); "
                       f"got score={self.score!r}")


@dataclasses.dataclass(frozen=True)
class OutputGateField(BaseAttentionConfig):
  """A sigmoid output gate on the heads (Qiu et al. 2025, "Gated Attention for Large Language Models", arXiv
  2505.06708)."""

  gate: str | None = None  # "elementwise" or "headwise"

  def __post_init__(self):
    super().__post_init__()
    if self.gate not in GATES:
      raise ValueError(f"{type(self).__name__}.gate must be one of {GATES}; got {self.gate!r}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig(SinkLogit, OutputGateField, QKNorm, RopeVariants, QKVBias, GroupedKV):
  """Dot-product attention with a pluggable score function and the sink controls of the sink study.

  ``impl`` is a backend of :func:`attnlab.attend` ("xla" dense, "pallas" flash kernel, "auto", ...).
  Sink controls: ``sink_logit`` (see :class:`SinkLogit`), ``sink_token`` (one learned key/value pair prepended to
  the keys: StreamingLLM's placeholder sink, Xiao et al. 2024, arXiv 2309.17453), ``key_bias`` (a learned key
  slot with value 0) and ``value_bias`` (a learned value slot) from Gu et al. 2025, "When Attention Sink Emerges
  in Language Models", arXiv 2410.10781; ``gate`` (see :class:`OutputGateField`).
  ``window``: sliding-window (local) attention, query i sees keys ``i - W < j <= i`` (Mistral 7B, arXiv
  2310.06825; with ``sink_logit`` it is gpt-oss's banded layer); the sink slots stay visible to every query.
  """

  causal: bool = True
  sink_token: bool = False
  key_bias: bool = False
  value_bias: bool = False
  window: int | None = None  # sliding window: query i sees keys i-W+1 .. i (None: all earlier keys)

  def __post_init__(self):
    super().__post_init__()
    fields.integer(type(self).__name__, "window", self.window, allow_none=True)
    if self.window is not None and not self.causal:
      raise ValueError(f"AttentionConfig.window={self.window} needs causal=True")

  def implementations(self) -> tuple[str, ...]:
    return implementations()

  @property
  def has_sink_slot(self) -> bool:
    return self.sink_token or self.key_bias or self.value_bias
