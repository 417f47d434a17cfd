"""attnlab: a JAX/Flax NNX research framework for attention variants and attention sinks."""

from attnlab.attention import attend, attention_weights, available_scores
from attnlab.attention.config import AttentionConfig, BaseAttentionConfig
from attnlab.attention.registry import attention_kinds, register_attention
from attnlab.inference import generate
from attnlab.model import DecoderLM, ModelConfig

__all__ = ["AttentionConfig", "BaseAttentionConfig", "DecoderLM", "ModelConfig", "attend", "attention_kinds",
           "attention_weights", "available_scores", "generate", "register_attention"]
__version__ = "0.1.0"
