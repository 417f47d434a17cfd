"""Weights stored only as ``pytorch_model.bin`` (older hub revisions, e.g. Pythia's training checkpoints): read with
torch (an optional dependency) in ``weights_only`` mode, which unpickles tensors and plain containers only."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def has_torch_weights(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f)) for f in (BIN_FILE, BIN_INDEX_FILE))


def _files(directory: str) -> list[str]:
  index = os.path.join(directory, BIN_INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ValueError(f"{index}: unreadable shard index ({e})") from None
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise ValueError(f"{index} lists shard(s) that are missing: {missing}")
    return [os.path.join(directory, f) for f in files]
  return [os.path.join(directory, BIN_FILE)]


def load_torch_checkpoint(directory: str) -> dict[str, np.ndarray]:
  """Every tensor of the ``pytorch_model.bin`` checkpoint (or its shards) in ``directory``, as numpy arrays
  (bfloat16 as ``ml_dtypes.bfloat16``)."""
  try:
    import torch  # optional heavy dependency
  except ImportError:
    raise ValueError(f"{directory} stores its weights as pytorch_model.bin, which needs torch to read (pip install "
                     "torch), or convert it to safetensors") from None
  tensors: dict[str, np.ndarray] = {}
  for path in _files(directory):
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (torch raises many types for a truncated or foreign file)
      raise ValueError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
      raise ValueError(f"{path}: not a state dict")
    for name, t in state.items():
      if name in tensors:
        raise ValueError(f"tensor {name!r} is stored twice ({path})")
      if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path}: entry {name!r} is not a tensor")
      t = t.detach().cpu().contiguous()
      if t.dtype == torch.bfloat16:
        tensors[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
      else:
        tensors[name] = t.numpy()
  return tensors
