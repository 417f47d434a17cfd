"""Pretrained checkpoints: Hugging Face decoder models imported into :class:`attnlab.model.DecoderLM`."""

from attnlab.pretrained.hf import (MODEL_TYPES, hf_model_config, hf_state_to_params, hf_tokenizer, load_hf,
                                   params_into_model, read_hf_config)
from attnlab.pretrained.safetensors_io import load_checkpoint, read_safetensors, write_safetensors
from attnlab.pretrained.torch_bin import load_torch_checkpoint

__all__ = ["MODEL_TYPES", "hf_model_config", "hf_state_to_params", "hf_tokenizer", "load_hf", "load_checkpoint", "load_torch_checkpoint",
           "params_into_model", "read_hf_config", "read_safetensors", "write_safetensors"]
