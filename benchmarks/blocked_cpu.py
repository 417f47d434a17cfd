"""Blocked (flash-style, pure JAX) vs dense softmax attention on CPU: fwd+bwd time, the impl="auto" crossover and
compiled temporary memory. Writes benchmarks/results/blocked_cpu.json.

    PYTHONPATH=. python benchmarks/blocked_cpu.py [--sizes 128 256 ... 4096] [--mem_sizes 1024 ... 16384]

Same process, interleaved (every implementation once per round, the order rotated each round, rounds repeated), median of ``--repeats`` rounds
after a warm-up, the 1-minute load average recorded before and after each size. Implementations (causal, float32,
batch 1, 4 heads, head_dim 64, fwd+bwd = grad of sum(o * w) w.r.t. q, k, v):
  * ``dense``: ``attend(impl="xla")`` (the lean dense path); ``blocked``: ``attend(impl="blocked")``;
  * ``naive``: einsum + where + ``jax.nn.softmax`` + einsum written inline (what a user would write).
Memory: XLA's ``jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`` of the same fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp

import attnlab
from _timing import rotated_rounds  # benchmarks/_timing.py (the script's folder is on sys.path)
from attnlab.attention.blocked import default_blocks


def machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return dict(cpu=cpu, cpu_count=os.cpu_count(), platform=platform.platform(), jax=jax.__version__,
              backend=jax.default_backend())


def load() -> float:
  return os.getloadavg()[0]


def naive(q, k, v):
  n, d = q.shape[1], q.shape[-1]
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


IMPLS = {
    "dense": lambda q, k, v: attnlab.attend(q, k, v, impl="xla"),
    "blocked": lambda q, k, v: attnlab.attend(q, k, v, impl="blocked"),
    "naive": naive,
}


def fwd_bwd(attn):
  return jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2)))


def interleaved(fns: dict, args, repeats: int) -> dict:
  """Median seconds per implementation; each round runs every implementation once (same conditions), in an order
  rotated each round (:func:`_timing.rotated_rounds`). Also XLA's compiled temporary bytes of each."""
  compiled = {name: fn.lower(*args).compile() for name, fn in fns.items()}
  for c in compiled.values():
    jax.block_until_ready(c(*args))
  times = rotated_rounds(compiled, repeats, lambda name, _: jax.block_until_ready(compiled[name](*args)))
  return {name: dict(median_s=statistics.median(t), all_s=t,
                     temp_bytes=int(compiled[name].memory_analysis().temp_size_in_bytes))
          for name, t in times.items()}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096])
  p.add_argument("--mem_sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default="benchmarks/results/blocked_cpu.json")
  a = p.parse_args()
  fns = {name: fwd_bwd(f) for name, f in IMPLS.items()}
  rows = []
  for n in a.sizes:
    ks = jax.random.split(jax.random.key(n), 4)
    args = [jax.random.normal(kk, (1, n, a.heads, a.head_dim), jnp.float32) for kk in ks]
    load_before = load()
    t = interleaved(fns, args, a.repeats)
    row = dict(n=n, block=list(default_blocks(n)), load_avg_1m=[load_before, load()], **t,
               blocked_over_dense=t["blocked"]["median_s"] / t["dense"]["median_s"],
               dense_over_naive=t["dense"]["median_s"] / t["naive"]["median_s"])
    print(json.dumps({k: v for k, v in row.items() if k not in IMPLS}), flush=True)
    rows.append(row)
  # crossover: the smallest measured n from which blocked is faster than dense at every larger measured n
  crossover = None
  for r in reversed(rows):
    if r["blocked_over_dense"] >= 1.0:
      break
    crossover = r["n"]
  memory = []
  for n in a.mem_sizes:
    spec = jax.ShapeDtypeStruct((1, n, a.heads, a.head_dim), jnp.float32)
    row = dict(n=n, n_by_n_f32_bytes_per_head=4 * n * n)
    for name in ("dense", "blocked"):
      row[f"{name}_temp_bytes"] = int(fns[name].lower(spec, spec, spec, spec).compile().memory_analysis()
                                      .temp_size_in_bytes)
    print(json.dumps(row), flush=True)
    memory.append(row)
  by_n = {r["n"]: r for r in rows}
  summary = dict(
      blocked_over_dense_at_2048=by_n[2048]["blocked_over_dense"] if 2048 in by_n else None,
      target_blocked_over_dense_at_2048=0.35,
      crossover_n=crossover,
      blocked_temp_bytes=({r["n"]: r["blocked_temp_bytes"] for r in memory}),
      blocked_temp_growth_per_doubling=[memory[i + 1]["blocked_temp_bytes"] / memory[i]["blocked_temp_bytes"]
                                        for i in range(len(memory) - 1)],
      dense_temp_bytes=({r["n"]: r["dense_temp_bytes"] for r in memory}),
  )
  result = dict(
      benchmark="blocked_cpu", machine=machine(),
      config=dict(batch=1, heads=a.heads, head_dim=a.head_dim, dtype="float32", causal=True,
                  repeats=a.repeats, measure="fwd+bwd: jit(grad(sum(attend(q, k, v) * w))) w.r.t. q, k, v"),
      note=("Shared 2-vCPU machine with other jobs running (see load_avg_1m per size): ratios measured in the same "
            "round are meaningful, absolute times are not. Median of the interleaved rounds after one warm-up."),
      rows=rows, memory=memory, summary=summary)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
