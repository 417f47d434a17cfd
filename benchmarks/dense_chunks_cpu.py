"""The dense path's batch chunks on CPU: fwd+bwd time and compiled temporaries of ``dense_attention`` with every
``batch_chunk`` that divides the batch, against the whole batch at once (the dense path before chunks) and the
blocked path. Writes benchmarks/results/dense_chunks_cpu.json; the README's table is generated from it.

    PYTHONPATH=. python benchmarks/dense_chunks_cpu.py [--shapes 16x256 8x512 32x128] [--repeats 7]

Same process, interleaved (every option once per round), median of ``--repeats`` rounds after a warm-up, the
1-minute load average recorded per shape. Causal softmax, float32, 4 heads, head_dim 64 (the default LM's
attention); fwd+bwd = grad of sum(o * w) w.r.t. q, k, v. ``policy`` is what ``attend(impl="xla")`` picks on CPU
(:func:`attnlab.ops.dense.cpu_batch_chunk`, budget ``CPU_CHUNK_LOGIT_BYTES``).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

import attnlab
from attnlab.ops.dense import CPU_CHUNK_LOGIT_BYTES, cpu_batch_chunk, dense_attention
from blocked_cpu import fwd_bwd, interleaved, load, machine  # benchmarks/ (the script's folder is on sys.path)


def options(batch: int) -> dict:
  """name -> attention function: every chunk size that divides the batch, the whole batch, the blocked path."""
  fns = {"whole": lambda q, k, v: dense_attention(q, k, v)}
  for c in range(1, batch):
    if batch % c == 0:
      fns[f"chunk_{c}"] = lambda q, k, v, c=c: dense_attention(q, k, v, batch_chunk=c)
  fns["blocked"] = lambda q, k, v: attnlab.attend(q, k, v, impl="blocked")
  return fns


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--shapes", nargs="+", default=["16x256", "8x512", "32x128"], help="batch x seq")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--out", default="benchmarks/results/dense_chunks_cpu.json")
  a = p.parse_args()
  rows = []
  for shape in a.shapes:
    batch, n = (int(x) for x in shape.split("x"))
    ks = jax.random.split(jax.random.key(n), 4)
    args = [jax.random.normal(kk, (batch, n, a.heads, a.head_dim), jnp.float32) for kk in ks]
    fns = {name: fwd_bwd(f) for name, f in options(batch).items()}
    load_before = load()
    times = interleaved(fns, args, a.repeats)
    policy = cpu_batch_chunk(batch, a.heads, n, n)
    policy_name = "whole" if policy is None else f"chunk_{policy}"
    whole = times["whole"]["median_s"]
    row = dict(batch=batch, n=n, load_avg_1m=[load_before, load()], policy=policy_name,
               logit_bytes_per_sequence=4 * a.heads * n * n,
               median_s={name: t["median_s"] for name, t in times.items()},
               all_s={name: t["all_s"] for name, t in times.items()},
               temp_bytes={name: t["temp_bytes"] for name, t in times.items()},
               speedup_over_whole={name: whole / t["median_s"] for name, t in times.items()},
               best=min(times, key=lambda name: times[name]["median_s"]))
    print(json.dumps({k: v for k, v in row.items() if k != "all_s"}), flush=True)
    rows.append(row)
  result = dict(
      benchmark="dense_chunks_cpu", machine=machine(),
      config=dict(heads=a.heads, head_dim=a.head_dim, dtype="float32", causal=True, repeats=a.repeats,
                  cpu_chunk_logit_bytes=CPU_CHUNK_LOGIT_BYTES,
                  measure="fwd+bwd: jit(grad(sum(attention(q, k, v) * w))) w.r.t. q, k, v"),
      note=("Shared 2-vCPU machine (see load_avg_1m per shape): options timed in the same interleaved rounds; "
            "compare them with each other, not across runs."),
      rows=rows)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
