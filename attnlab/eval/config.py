"""Typed, frozen configuration of evaluation."""

from __future__ import annotations

import dataclasses

from attnlab import fields


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out perplexity / bits-per-byte, length extrapolation and passkey retrieval.

  ``length_factors`` multiply the training ``seq_len`` (lengths beyond ``ModelConfig.max_seq_len`` are skipped
  and reported). ``passkey_lengths`` are absolute context lengths; empty -> no passkey evaluation.
  ``passkey_inference``: "forward" (one pass, up to max_seq_len), "landmark" (chunked top-k retrieval,
  :class:`attnlab.eval.landmark_runner.LandmarkRunner`) or "auto" (landmark when every layer is landmark
  attention); ``landmark_chunk_len`` None -> the reference rule ``max_chunk_len(seq_len, block_size, top_k)``."""

  num_batches: int = 8  # held-out batches per length (0 -> the whole held-out split at 1x)
  batch_size: int | None = None  # None -> DataConfig.batch_size
  length_factors: tuple[int, ...] = (1, 2, 4)
  passkey_lengths: tuple[int, ...] = ()
  passkey_examples: int = 16
  passkey_digits: int = 5
  passkey_inference: str = "auto"
  landmark_chunk_len: int | None = None
  in_training_batches: int = 2  # held-out batches for the eval every TrainConfig.eval_every steps

  def __post_init__(self):
    o = "EvalConfig"
    object.__setattr__(self, "length_factors", fields.int_tuple(o, "length_factors", self.length_factors))
    object.__setattr__(self, "passkey_lengths", fields.int_tuple(o, "passkey_lengths", self.passkey_lengths))
    fields.integer(o, "num_batches", self.num_batches, minimum=0)
    fields.integer(o, "batch_size", self.batch_size, allow_none=True)
    fields.integer(o, "passkey_examples", self.passkey_examples)
    fields.integer(o, "passkey_digits", self.passkey_digits)
    fields.integer(o, "landmark_chunk_len", self.landmark_chunk_len, allow_none=True)
    fields.integer(o, "in_training_batches", self.in_training_batches)
    if self.passkey_inference not in ("auto", "forward", "landmark"):
      raise ValueError(f"passkey_inference must be 'auto', 'forward' or 'landmark'; got {self.passkey_inference!r}")
