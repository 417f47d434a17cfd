"""Per-head decay schedules of lightning attention, as log-decays ``s_h >= 0`` with ``lambda_h = exp(-s_h)``.

Two published conventions, one config value apart (``LightningConfig.decay``):

* ``"tnl"`` -- the released TransNormerLLM weights (HF ``modeling_transnormer.py``; also
  ``OpenNLPLab/lightning-attention`` ``examples/module/tnl_attn.py`` and MiniMax-style code):
  ``s_{h,l} = alibi_h * (1 - l / (L - 1) + 1e-5)`` with the ALiBi slopes ``alibi_h`` (Press et al. 2022).
  Layer 0 decays most; the last layer has ``s ~ 1e-5 * alibi_h`` (almost no decay).
* ``"fla"`` -- flash-linear-attention's ``chunk_lightning_attn``: ``s_{h,l} = (8 / H) * (1 - l / L) * h``
  (head 0 has no decay; the formula usually quoted from the TransNormerLLM paper). NOT what the released TNL
  weights use.
* ``"none"`` -- ``s = 0`` (``lambda = 1``): plain causal linear attention.
"""

from __future__ import annotations

import math

import numpy as np

DECAYS = ("tnl", "fla", "none")


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi slopes (Press et al. 2022): ``2^(-8(h+1)/H)`` for power-of-two ``H``; otherwise the slopes of the
  closest smaller power of two followed by every other slope of twice that."""
  if num_heads <= 0:
    raise ValueError(f"num_heads must be positive; got {num_heads}")

  def power_of_two(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start ** (i + 1) for i in range(n)]

  if math.log2(num_heads).is_integer():
    return np.asarray(power_of_two(num_heads), np.float64)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.concatenate([power_of_two(closest), extra])


def log_decay(schedule: str, num_heads: int, layer: int = 0, num_layers: int = 1) -> np.ndarray:
  """(num_heads,) float64 log-decays ``s_h >= 0`` of layer ``layer`` (0-based) in a stack of ``num_layers``."""
  if schedule not in DECAYS:
    raise ValueError(f"unknown decay schedule {schedule!r}; expected one of {DECAYS}")
  if num_layers <= 0 or not 0 <= layer < num_layers:
    raise ValueError(f"need 0 <= layer < num_layers; got layer={layer}, num_layers={num_layers}")
  if schedule == "none":
    return np.zeros(num_heads)
  if schedule == "tnl":
    return alibi_slopes(num_heads) * (1.0 - layer / max(num_layers - 1, 1) + 1e-5)
  return 8.0 / num_heads * (1.0 - layer / num_layers) * np.arange(num_heads, dtype=np.float64)
