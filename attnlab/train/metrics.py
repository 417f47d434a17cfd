"""Run logging: ``metrics.jsonl``, TensorBoard events and the FLOP count behind the MFU estimate.

TensorBoard events are written with ``tensorboardX``: maintained, pure Python, no TensorFlow dependency
(``flax.metrics.tensorboard`` and ``clu`` import TensorFlow, a >1 GB install for a summary writer).
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
from tensorboardX import SummaryWriter


def matmul_flops_per_token(params, model_cfg, seq_len: int) -> float:
  """Training FLOPs per token: 6·N (N = parameters used in matmuls: every matrix but the input embedding table,
  which is a lookup, unless tied) + 12·L·H·Dh·T for the attention scores and mixing (PaLM appendix B, full T)."""
  n = 0
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if x.ndim >= 2 and ("embed" not in names or model_cfg.tie_embeddings):
      n += x.size
  attn = 0
  for layer in range(model_cfg.num_layers):
    a = model_cfg.layer_attention(layer)
    attn += 12 * a.num_heads * a.resolved_head_dim(model_cfg.d_model) * seq_len
  return 6.0 * n + attn


def measure_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best-of-``repeats`` f32 FLOP/s of an n×n matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def truncate_rows(path: str, resume_step: int) -> None:
  """Drops the rows a resumed run will write again: every row after ``resume_step`` (every row when starting at
  step 0), and a torn last line; atomic. So ``metrics.jsonl`` holds each step once after any number of resumes."""
  if not os.path.exists(path):
    return
  keep = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue  # a line torn by a kill
      if resume_step > 0 and isinstance(row, dict) and row.get("step", 0) <= resume_step:
        keep.append(json.dumps(row) + "\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


class MetricsWriter:
  """Appends one JSON object per log step to ``metrics.jsonl`` and mirrors scalars to TensorBoard. An inactive
  writer (every process but 0 of a multi-process run) writes nothing."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, active: bool = True, resume_step: int | None = None):
    self.active = active
    if not active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      truncate_rows(path, resume_step)
    self._jsonl = open(path, "a")
    self._tb = None
    if tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    if not self.active:
      return
    row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(k, float(v), step)

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
