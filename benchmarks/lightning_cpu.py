"""Lightning attention (chunked, jnp) vs softmax attention (attnlab.attend): fwd+bwd time and compiled temp
memory vs sequence length on CPU. Writes benchmarks/results/lightning_cpu.json.

    PYTHONPATH=. python benchmarks/lightning_cpu.py [--max_n 16384] [--repeats 2]

Claim under test (Lightning Attention-2): constant cost per token. Softmax timing stops once the next length is
predicted to exceed ``--softmax_budget_s`` (its memory is still taken from the compiled program).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp

import attnlab
from attnlab.ops.lightning import lightning_chunked, log_decay
from _timing import compile_and_time  # benchmarks/_timing.py (the script's folder is on sys.path)


def _fwd_bwd(kind: str, block: int, s):
  if kind == "lightning":
    attn = lambda q, k, v: lightning_chunked(q, k, v, s, block_size=block)
  else:
    attn = lambda q, k, v: attnlab.attend(q, k, v, causal=True)
  return jax.jit(jax.grad(lambda q, k, v, w: jnp.sum(attn(q, k, v) * w), argnums=(0, 1, 2)))


def _measure(fn, args, repeats: int, run: bool):
  m = compile_and_time(fn, args, repeats, run)
  row = dict(temp_bytes=m["temp_bytes"], argument_bytes=m["argument_bytes"])
  if run:
    row["fwd_bwd_s"] = sorted(m["times"])[len(m["times"]) // 2]
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--block", type=int, default=64)
  p.add_argument("--min_n", type=int, default=1024)
  p.add_argument("--max_n", type=int, default=16384)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--softmax_budget_s", type=float, default=60.0)
  p.add_argument("--out", default="benchmarks/results/lightning_cpu.json")
  a = p.parse_args()
  s = jnp.asarray(log_decay("tnl", a.heads), jnp.float32)
  fns = {kind: _fwd_bwd(kind, a.block, s) for kind in ("lightning", "softmax")}
  rows, n, run_softmax = [], a.min_n, True
  while n <= a.max_n:
    ks = jax.random.split(jax.random.key(n), 4)
    args = [jax.random.normal(kk, (a.batch, n, a.heads, a.head_dim)) * 0.1 for kk in ks]
    row = dict(n=n)
    for kind, fn in fns.items():
      run = kind == "lightning" or run_softmax
      row[kind] = _measure(fn, args, a.repeats, run)
      if run:
        row[kind]["us_per_token"] = 1e6 * row[kind]["fwd_bwd_s"] / n
    soft_t = row["softmax"].get("fwd_bwd_s")
    # Softmax is quadratic: next length costs ~4x; skip timing it (warm-up + repeats) past the budget.
    run_softmax = soft_t is not None and 4 * soft_t * (a.repeats + 1) <= a.softmax_budget_s
    print(json.dumps(row), flush=True)
    rows.append(row)
    n *= 2
  light = [r["lightning"] for r in rows]
  common = [r for r in rows if "fwd_bwd_s" in r["softmax"]]
  summary = dict(
      lightning_per_token_ratio_max_over_min_n=light[-1]["us_per_token"] / light[0]["us_per_token"],
      ratio_lengths=[rows[-1]["n"], rows[0]["n"]],
      largest_common_n=common[-1]["n"] if common else None,
      speedup_over_softmax_at_largest_common_n=(common[-1]["softmax"]["fwd_bwd_s"] / common[-1]["lightning"]["fwd_bwd_s"]
                                                if common else None),
      temp_memory_ratio_softmax_over_lightning_at_max_n=rows[-1]["softmax"]["temp_bytes"] / light[-1]["temp_bytes"],
  )
  result = dict(
      benchmark="lightning_cpu",
      hardware=dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                    cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend()),
      note=("Shared, noisy machine: 2 vCPUs (about one core of compute) shared with other jobs, so absolute times "
            f"are noisy; median of {a.repeats} runs after one warm-up. fwd+bwd = jit(grad(sum(attn(q,k,v) * w))) "
            "w.r.t. q, k, v. Memory = XLA compiled memory_analysis().temp_size_in_bytes (peak scratch, excludes "
            "arguments), available for every n even where softmax was not timed. Softmax = attnlab.attend "
            "(dense causal, float32). Lightning = attnlab.ops.lightning.lightning_chunked (jnp; the Pallas "
            "kernel is not timed: interpret mode on CPU measures nothing)."),
      config=dict(batch=a.batch, heads=a.heads, head_dim=a.head_dim, value_dim=a.head_dim, block=a.block,
                  dtype="float32", decay="tnl", repeats=a.repeats, softmax_budget_s=a.softmax_budget_s),
      rows=rows, summary=summary)
  os.makedirs(os.path.dirname(a.out), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
