"""CPU (Pallas interpret mode) check of the flash kernel: correctness vs attnlab.attend and compiled memory.

Interpret mode says nothing about speed; this records (a) the max error of the GPU-style and TPU-style kernels'
forward against the dense XLA path for every score function with flash hooks and (b) XLA's compiled temp memory of
fwd and fwd+bwd for the kernel vs the dense path as n grows (the kernel never holds an n x n map).
Writes benchmarks/results/flash_cpu.json.  Run: PYTHONPATH=. python benchmarks/flash_cpu.py
"""

from __future__ import annotations

import json
import os
import platform

import jax
import jax.numpy as jnp

import attnlab
from kernels_pallas.flash import BlockSizes, flash_attention

SCORES = [("softmax", {}), ("sigmoid", {}), ("sigmoid", {"normalize": True}), ("softpick", {}), ("relu", {}),
          ("softplus", {})]


def correctness(n=128, d=32):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, n, 4, d))
  k, v = (jax.random.normal(kk, (1, n, 2, d)) for kk in keys[1:])
  seg = (jnp.arange(n) >= n // 3).astype(jnp.int32)[None]
  rows = []
  for backend in ("gpu", "tpu"):
    for score, params in SCORES:
      sinks = jnp.array([-30.0, 0.0, 4.0, 30.0]) if score == "softmax" else None
      kw = dict(score=score, segment_ids=seg, sink_logits=sinks, **params)
      # interpret mode: the GPU-style kernel under the generic interpreter, the TPU kernel under the TPU simulator
      out = jax.jit(lambda q, k, v: flash_attention(q, k, v, backend=backend, block_sizes=BlockSizes(64, 32),
                                                    **kw))(q, k, v)
      err = float(jnp.abs(out - attnlab.attend(q, k, v, **kw)).max())
      rows.append(dict(backend=backend, score=score, params=params, n=n, head_dim=d, max_abs_err_vs_xla=err))
      print(rows[-1], flush=True)
  return rows


def memory(lengths=(512, 1024, 2048, 4096), d=64):
  rows = []
  for n in lengths:
    spec = jax.ShapeDtypeStruct((1, n, 1, d), jnp.float32)
    for impl in ("pallas", "xla"):
      fn = lambda q, k, v: attnlab.attend(q, k, v, impl=impl)
      loss = lambda q, k, v: jnp.sum(fn(q, k, v))
      row = dict(impl=impl, n=n, head_dim=d, n_by_n_f32_bytes=4 * n * n)
      for tag, f in (("fwd", fn), ("fwd_bwd", jax.grad(loss, argnums=(0, 1, 2)))):
        row[f"{tag}_temp_bytes"] = jax.jit(f).trace(spec, spec, spec).lower().compile().memory_analysis() \
            .temp_size_in_bytes
      rows.append(row)
      print(row, flush=True)
  return rows


def main():
  report = dict(benchmark="flash_cpu", hardware=f"CPU ({platform.processor() or platform.machine()}), "
                f"{os.cpu_count()} vCPUs, jax {jax.__version__}", mode="Pallas interpret mode",
                note="correctness and compiled memory only; interpret-mode timings are meaningless and not "
                     "reported; the machine was shared with other jobs",
                correctness=correctness(), memory=memory())
  out = os.path.join(os.path.dirname(__file__), "results", "flash_cpu.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print("wrote", out)
  assert all(r["max_abs_err_vs_xla"] < 1e-4 for r in report["correctness"])
  pallas = [r for r in report["memory"] if r["impl"] == "pallas"]
  growth = pallas[-1]["fwd_bwd_temp_bytes"] / pallas[0]["fwd_bwd_temp_bytes"]
  assert growth < 2 * pallas[-1]["n"] / pallas[0]["n"], growth  # linear in n (an n x n buffer would be quadratic)


if __name__ == "__main__":
  main()
