from attnlab.model.config import ModelConfig
from attnlab.model.lm import DecoderLM

__all__ = ["DecoderLM", "ModelConfig"]
