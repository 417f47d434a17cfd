"""Block sizes of the flash kernels, checked against the shapes and the target backend."""

from __future__ import annotations

import dataclasses

BACKENDS = ("gpu", "tpu")


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes. ``block_q`` x ``block_kv`` is the largest logits tile a kernel ever holds (never q_len x kv_len).

  The backward pass uses ``block_q_bwd`` / ``block_kv_bwd`` (default: the forward sizes). A size larger than the
  sequence is clamped to it; a size that does not divide the sequence is an error.
  """

  block_q: int = 128
  block_kv: int = 128
  block_q_bwd: int | None = None
  block_kv_bwd: int | None = None
  num_warps: int = 4  # Triton launch parameters (GPU kernel only)
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_q", "block_kv", "block_q_bwd", "block_kv_bwd", "num_warps", "num_stages"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, int) or value <= 0):
        raise ValueError(f"BlockSizes.{name} must be a positive int; got {value!r}")

  def resolve(self, q_len: int, kv_len: int, head_dim: int, backend: str, interpret: bool) -> "BlockSizes":
    """Concrete sizes for these shapes: clamped to the sequence lengths and validated for ``backend``.

    Divisibility is always required. Hardware rules apply when ``interpret`` is False (interpret mode on CPU
    accepts any divisor): Triton GPU tiles need powers of two >= 16 (tl.dot) and a power-of-two head_dim >= 16;
    TPU tiles need block_q % 8 == 0 and block_kv % 128 == 0 (sublane x lane) unless the block is the full length.
    """
    if backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    fwd_q, fwd_kv = min(self.block_q, q_len), min(self.block_kv, kv_len)
    sizes = dict(block_q=fwd_q, block_kv=fwd_kv,
                 block_q_bwd=min(self.block_q_bwd or fwd_q, q_len),
                 block_kv_bwd=min(self.block_kv_bwd or fwd_kv, kv_len))
    for name, value in sizes.items():
      length, axis = (q_len, "q_len") if "_q" in name else (kv_len, "kv_len")
      if length % value:
        raise ValueError(f"{name}={value} does not divide {axis}={length}; pick a block size that divides it "
                         f"(or pad the sequence)")
      if interpret:
        continue
      if backend == "gpu" and (not _is_pow2(value) or value < 16):
        raise ValueError(f"{name}={value}: Triton GPU blocks must be powers of two >= 16")
      if backend == "tpu" and value != length:
        multiple = 8 if "_q" in name else 128
        if value % multiple:
          raise ValueError(f"{name}={value}: TPU blocks must be multiples of {multiple} (or the full {axis})")
    if not interpret and backend == "gpu" and (not _is_pow2(head_dim) or head_dim < 16):
      raise ValueError(f"head_dim={head_dim}: the Triton GPU kernel needs a power of two >= 16")
    return dataclasses.replace(self, **sizes)
