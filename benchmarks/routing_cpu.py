"""Routing attention (both rules, routing included) vs causal softmax (attnlab.attend): fwd+bwd wall time vs
sequence length on CPU, with k = w = √n. Writes benchmarks/results/routing_cpu.json.

    PYTHONPATH=. python benchmarks/routing_cpu.py [--max_n 16384] [--repeats 2]

Claim under test (Roy et al. 2021): O(n^1.5·d) per routing head when k ≈ w ≈ √n, vs O(n²·d) for softmax.
The timed function maps the shared pre-LN query x and v to the output: x̂ = LN(x), routing against fixed
centroids, clustered attention; the gradient flows into x and v. Softmax timing stops once its next length is
predicted to exceed ``--softmax_budget_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import attnlab
from attnlab.attention.routing import (balanced_assignment, balanced_attention, layer_norm, nearest_attention,
                                       nearest_centroid)
from _timing import compile_and_time  # benchmarks/_timing.py (the script's folder is on sys.path)


def _attn(kind: str, mu, window: int):
  def fn(x, v):
    r = layer_norm(x)
    if kind == "softmax":
      return attnlab.attend(x, x, v, causal=True)
    if kind == "nearest":
      return nearest_attention(r, v, nearest_centroid(r, mu), window=window)
    return balanced_attention(r, v, balanced_assignment(r, mu, window))
  return jax.jit(jax.grad(lambda x, v, w: jnp.sum(fn(x, v) * w), argnums=(0, 1)))


def _time(fn, args, repeats: int) -> float:
  return min(compile_and_time(fn, args, repeats)["times"])


def _slope(rows, kind):
  pts = [(r["n"], r[kind]) for r in rows if kind in r]
  if len(pts) < 2:
    return None
  return float(np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0])


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--min_n", type=int, default=1024)
  p.add_argument("--max_n", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--softmax_budget_s", type=float, default=30.0)
  p.add_argument("--out", default="benchmarks/results/routing_cpu.json")
  a = p.parse_args()
  rows, n, run_softmax = [], a.min_n, True
  while n <= a.max_n:
    k = round(math.sqrt(n))
    w = math.ceil(n / k)
    ks = jax.random.split(jax.random.key(n), 4)
    x, v, g = (jax.random.normal(kk, (a.batch, n, a.heads, a.head_dim)) for kk in ks[:3])
    mu = layer_norm(jax.random.normal(ks[3], (a.heads, k, a.head_dim)))
    row = dict(n=n, clusters=k, window=w)
    for kind in ("nearest", "balanced", "softmax"):
      if kind == "softmax" and not run_softmax:
        continue
      row[kind] = _time(_attn(kind, mu, w), (x, v, g), a.repeats)
    run_softmax = "softmax" in row and 4 * row["softmax"] * (a.repeats + 1) <= a.softmax_budget_s
    print(json.dumps(row), flush=True)
    rows.append(row)
    n *= 2
  out = dict(
      benchmark="routing attention fwd+bwd vs causal softmax (attnlab.attend), k = round(sqrt(n)), w = ceil(n/k)",
      hardware=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                    cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend()),
      config=dict(batch=a.batch, heads=a.heads, head_dim=a.head_dim, repeats=a.repeats, timing="min over repeats"),
      note=("Shared, noisy CPU (2 vCPUs shared with several other jobs; load average > 10 during the run): "
            "absolute times are inflated and jittery, only the scaling is meaningful. Few repeats to keep the run "
            "short. Softmax stops where its next length would exceed the time budget."),
      rows=rows,
      loglog_slope={kind: _slope(rows, kind) for kind in ("nearest", "balanced", "softmax")},
  )
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out["loglog_slope"]))


if __name__ == "__main__":
  main()
