"""Typed, frozen configuration of the decoder-only LM."""

from __future__ import annotations

import dataclasses

from attnlab.attention.config import AttentionConfig, BaseAttentionConfig, ScoreFields
from attnlab.layers import MLP_ACTIVATIONS
from attnlab import fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only LM. ``attention`` is one config for every layer, or a tuple used as a repeating per-layer
  pattern: ``(lightning, lightning, lightning, softmax)`` with 8 layers = "every 4th layer softmax"."""

  vocab_size: int = 259  # byte-level: 256 bytes + BOS/EOS/PAD
  d_model: int = 256
  num_layers: int = 4
  attention: BaseAttentionConfig | tuple[BaseAttentionConfig, ...] = AttentionConfig()
  mlp_dim: int | None = None  # None -> 4 * d_model (gelu/relu) or the SwiGLU size 8/3 * d_model rounded to 64
  mlp_activation: str = "swiglu"
  norm: str = "rmsnorm"
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  max_seq_len: int = 4096  # longest sequence the model accepts (positions beyond it are refused)
  # "none": positions come from the attention layers (RoPE, or NoPE); "learned": a GPT-2-style absolute position
  # table of max_seq_len rows added to the token embeddings (the Bigram-Backcopy sink recipe of Guo et al. 2024)
  position_embedding: str = "none"
  init: str = "gpt"  # "gpt" (N(0, 0.02)) or "pytorch" (nn.Linear / nn.Embedding defaults)
  # h_{l+1} = h_l + Attn(Norm_1 h_l) + MLP(Norm_2 h_l) (GPT-J / GPT-NeoX) instead of the sequential block
  parallel_residual: bool = False
  mlp_bias: bool = False  # biases in the MLP projections (GPT-2, GPT-NeoX)
  norm_fast_variance: bool = True  # False: two-pass variance E[(x - E x)^2], as torch's LayerNorm

  dtype: str = "float32"  # compute dtype; parameters stay float32

  def __post_init__(self):
    if isinstance(self.attention, list):
      object.__setattr__(self, "attention", tuple(self.attention))
    o = "ModelConfig"
    for name in ("vocab_size", "d_model", "num_layers", "max_seq_len"):
      fields.integer(o, name, getattr(self, name))
    fields.integer(o, "mlp_dim", self.mlp_dim, allow_none=True)
    fields.choice(o, "mlp_activation", self.mlp_activation, MLP_ACTIVATIONS)
    fields.choice(o, "norm", self.norm, ("rmsnorm", "layernorm"))
    fields.number(o, "norm_eps", self.norm_eps, low=0.0, low_open=True)
    fields.choice(o, "init", self.init, ("gpt", "pytorch"))
    fields.choice(o, "dtype", self.dtype, ("float32", "bfloat16", "float16"))
    for name in ("tie_embeddings", "parallel_residual", "mlp_bias", "norm_fast_variance"):
      fields.boolean(o, name, getattr(self, name))
    for a in self.attention_pattern:
      if not isinstance(a, BaseAttentionConfig):
        raise ValueError(f"ModelConfig.attention must be an attention config (e.g. @AttentionConfig()) or a tuple "
                         f"of them; got {a!r}")
      if a.head_dim is None and self.d_model % a.num_heads:
        raise ValueError(f"ModelConfig.d_model ({self.d_model}) is not divisible by num_heads ({a.num_heads}) of "
                         f"{type(a).__name__}; change one or set head_dim")
    if self.position_embedding not in ("none", "learned"):
      raise ValueError(f"position_embedding must be 'none' or 'learned'; got {self.position_embedding!r}")
    pattern = self.attention_pattern
    if not pattern or self.num_layers % len(pattern):
      raise ValueError(f"the attention pattern has {len(pattern)} entries, which does not divide num_layers "
                       f"({self.num_layers})")

  @property
  def attention_pattern(self) -> tuple[BaseAttentionConfig, ...]:
    return self.attention if isinstance(self.attention, tuple) else (self.attention,)

  def layer_attention(self, layer: int) -> BaseAttentionConfig:
    """The config of layer ``layer``: the pattern entry, with its depth (``for_layer``) and, for score-function
    layers, sigmoid's default bias length ``bias_len = max_seq_len`` (a fixed ``b = -log max_seq_len``)."""
    pattern = self.attention_pattern
    cfg = pattern[layer % len(pattern)].for_layer(layer, self.num_layers)
    return cfg.with_max_seq_len(self.max_seq_len) if isinstance(cfg, ScoreFields) else cfg

  @property
  def resolved_mlp_dim(self) -> int:
    if self.mlp_dim is not None:
      return self.mlp_dim
    if self.mlp_activation == "swiglu":
      return 64 * max(1, round(8 * self.d_model / 3 / 64))
    return 4 * self.d_model
