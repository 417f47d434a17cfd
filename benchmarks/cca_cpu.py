"""CCA attention vs full causal softmax attention: forward+backward time and compiled memory on CPU.

    PYTHONPATH=. python benchmarks/cca_cpu.py [--sizes 1024 2048 ...] [--repeats 2] [--impl auto|blocked|xla]

Writes benchmarks/results/cca_cpu.json. Memory is XLA's compiled ``memory_analysis`` of the jitted fwd+bwd
(temp = intermediate working set; peak ~ temp + arguments + outputs), so it is exact and needs no run; times are
medians of a few runs after a warm-up. Full softmax (``attnlab.attend``, dense XLA: materialises the n x n scores)
is only timed while its working set stays below ``--softmax_max_gib``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import jax
import jax.numpy as jnp

import attnlab
from attnlab.attention.cca import cca_attention, cca_num_keys
from _timing import compile_and_time  # benchmarks/_timing.py (the script's folder is on sys.path)


def _fwd_bwd(attn):
  def loss(q, k, v):
    return jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _measure(fn, args, repeats: int, run: bool):
  m = compile_and_time(fn, args, repeats, run)
  out = dict(temp_bytes=m["temp_bytes"], peak_bytes=m["temp_bytes"] + m["argument_bytes"] + m["output_bytes"])
  if run:
    out["seconds"] = statistics.median(m["times"])
  return out


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--group_size", type=int, default=16)
  p.add_argument("--window_size", type=int, default=1024)
  p.add_argument("--block_q", type=int, default=512)
  p.add_argument("--impl", default="auto", choices=["auto", "blocked", "xla"])
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--softmax_max_gib", type=float, default=5.0)
  p.add_argument("--out", default="benchmarks/results/cca_cpu.json")
  a = p.parse_args()

  g, s = a.group_size, a.window_size
  cca = _fwd_bwd(lambda q, k, v: cca_attention(q, k, v, group_size=g, window_size=s, block_q=a.block_q,
                                                impl=a.impl))
  full = _fwd_bwd(lambda q, k, v: attnlab.attend(q, k, v))
  rows = []
  for n in a.sizes:
    ks = jax.random.split(jax.random.key(n), 3)
    args = [jax.random.normal(kk, (1, n, a.heads, a.head_dim), jnp.float32) for kk in ks]
    row = dict(seq_len=n, cca_keys_per_query=cca_num_keys(n, g, s), full_keys_per_query=(n + 1) / 2)
    row["cca"] = _measure(cca, args, a.repeats, run=True)
    soft_mem = full.lower(*args).compile().memory_analysis().temp_size_in_bytes
    run_soft = soft_mem <= a.softmax_max_gib * 2**30
    row["softmax"] = _measure(full, args, a.repeats, run=run_soft)
    if not run_soft:
      row["softmax"]["skipped_timing"] = f"working set {soft_mem / 2**30:.1f} GiB > {a.softmax_max_gib} GiB"
    if "seconds" in row["softmax"]:
      row["speedup"] = row["softmax"]["seconds"] / row["cca"]["seconds"]
    row["memory_ratio_temp"] = row["softmax"]["temp_bytes"] / row["cca"]["temp_bytes"]
    rows.append(row)
    print(json.dumps(row), flush=True)

  result = dict(
      benchmark=f"CCA attention (impl={a.impl!r}) vs full causal softmax (attnlab.attend, dense XLA)",
      hardware=f"CPU: {_cpu_name()}, {jax.device_count()} JAX device(s), jax {jax.__version__}",
      config=dict(batch=1, heads=a.heads, head_dim=a.head_dim, group_size=g, window_size=s, block_q=a.block_q,
                  impl=a.impl, dtype="float32", repeats=a.repeats, op="value_and_grad of sum(o^2) w.r.t. q, k, v"),
      note=("Shared, noisy machine (2 vCPUs used by several jobs at once): times are indicative only. Memory numbers "
            "are XLA's compiled memory_analysis (exact for this program). The softmax baseline materialises the n x n "
            "scores (no flash kernel on CPU), unlike the paper's FlashAttention baseline on GPU."),
      rows=rows)
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
