"""What a token-aware attention layer needs the data pipeline to interleave into its input: the protocol between
attention and :mod:`attnlab.data.special_tokens`.

A layer's config returns one of these specs from ``special_tokens()`` (landmark and meta-token layers do; the rest
return None). The data pipeline consumes the spec (``DataConfig.special_tokens``): where the special tokens go,
and how many ordinary tokens a row of ``seq_len`` slots holds (``source_len``). Attention never imports data.

* :class:`LandmarkTokens`: a landmark after every ``block_size - 1`` ordinary tokens (Mohtashami & Jaggi 2023,
  "Landmark Attention: Random-Access Infinite Context Length for Transformers", arXiv 2305.16300).
* :class:`MetaTokens`: a meta token before each ordinary token with probability ``rate`` (Shah et al. 2025,
  "Language Modeling with Learned Meta-Tokens", arXiv 2509.16278).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class LandmarkTokens:
  """Landmark insertion: ``block_size`` counts the landmark (``block_size - 1`` ordinary tokens per block)."""

  block_size: int
  landmark_id: int

  def __post_init__(self):
    if self.block_size < 2:
      raise ValueError(f"LandmarkTokens.block_size (landmark included) must be >= 2; got {self.block_size}")

  @property
  def ids(self) -> tuple[int, ...]:
    return (self.landmark_id,)

  def source_len(self, seq_len: int) -> int:
    """Ordinary tokens in a row of ``seq_len`` slots (the rest are landmarks)."""
    n = seq_len - math.ceil(seq_len / self.block_size)
    if n < 2:
      raise ValueError(f"seq_len {seq_len} leaves fewer than 2 ordinary tokens with block_size {self.block_size}")
    return n


@dataclasses.dataclass(frozen=True)
class MetaTokens:
  """Meta-token injection before each ordinary token with probability ``rate`` (ids uniform over ``meta_ids``)."""

  meta_ids: tuple[int, ...]
  rate: float

  def __post_init__(self):
    ids = (self.meta_ids,) if isinstance(self.meta_ids, int) else self.meta_ids
    object.__setattr__(self, "meta_ids", tuple(int(i) for i in ids))
    if not self.meta_ids:
      raise ValueError("MetaTokens.meta_ids must name at least one token id")
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"MetaTokens.rate must be in [0, 1); got {self.rate}")

  @property
  def ids(self) -> tuple[int, ...]:
    return self.meta_ids

  def source_len(self, seq_len: int) -> int:
    """Ordinary tokens read for a row of ``seq_len`` slots (the row is cut back to ``seq_len`` afterwards)."""
    return seq_len


SpecialTokens = LandmarkTokens | MetaTokens
