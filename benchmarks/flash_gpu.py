"""GPU benchmark of the Pallas flash kernel, the pure-JAX blocked path and the efficient variants (lightning, CCA,
routing) vs jax.nn.dot_product_attention (cuDNN and XLA), in one command.

Times forward and forward+backward for n = 1k..32k, head_dim 64/128, bf16, causal (and optionally non-causal),
at a fixed 2048-wide model (heads = 2048 / head_dim) and ~16k tokens per batch (batch = max(1, 16384 / n)).
Reports ms and TFLOP/s (FLOPs: 4 * B * H * n^2 * d forward, halved when causal; fwd+bwd = 3.5x forward, the
FlashAttention convention) and the device's peak memory. Writes benchmarks/results/flash_gpu_<device>.json.

The efficient variants are causal only: ``lightning`` (``lightning_chunked``, chunk 64, TNL decay), ``cca``
(``cca_attention``, g 16, s 1024, blocked core) and ``cca_xla`` (its fused-row path), ``routing`` (nearest-centroid,
shared q = k, k = round(sqrt(n)), w = ceil(n / k); sorted chunks) and ``routing_blocked`` (on the blocked core);
their TFLOP/s column uses the softmax FLOP count (an "effective" rate: time relative to full attention).

Run on an NVIDIA GPU:  PYTHONPATH=. python benchmarks/flash_gpu.py
Smoke-test the script on CPU (interpret mode, tiny sizes, NOT performance numbers):  ... --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import math

import jax
import jax.numpy as jnp

import attnlab
from attnlab.attention.cca import cca_attention
from attnlab.ops.lightning import lightning_chunked, log_decay
from attnlab.attention.routing import layer_norm, nearest_attention, nearest_centroid
from kernels_pallas.flash import BlockSizes, flash_attention

IMPLS = ("pallas_softmax", "pallas_sigmoid", "blocked", "cudnn", "xla", "lightning", "cca", "cca_xla", "routing",
         "routing_blocked")
CAUSAL_ONLY = ("lightning", "cca", "cca_xla", "routing", "routing_blocked")


def _attention_fn(impl: str, causal: bool, blocks: BlockSizes, interpret: bool, n: int = 0, heads: int = 1,
                  head_dim: int = 64):
  if impl == "blocked":  # flash-style attention in pure JAX (lax loops), no Pallas
    return lambda q, k, v: attnlab.attend(q, k, v, causal=causal, impl="blocked")
  if impl == "lightning":
    s = jnp.asarray(log_decay("tnl", heads), jnp.float32)
    return lambda q, k, v: lightning_chunked(q, k, v, s, block_size=64, scale=1.0 / math.sqrt(head_dim))
  if impl in ("cca", "cca_xla"):
    cca_impl = "xla" if impl == "cca_xla" else "blocked"
    return lambda q, k, v: cca_attention(q, k, v, group_size=16, window_size=min(1024, n), impl=cca_impl)
  if impl in ("routing", "routing_blocked"):
    routing_impl = "blocked" if impl == "routing_blocked" else "chunks"
    clusters = max(1, round(math.sqrt(n)))
    mu = layer_norm(jax.random.normal(jax.random.key(7), (heads, clusters, head_dim)))

    def routing(q, k, v):
      del k
      r = layer_norm(q)
      return nearest_attention(r, v, nearest_centroid(r, mu).astype(jnp.int32), window=math.ceil(n / clusters),
                               impl=routing_impl)
    return routing
  if impl == "pallas_softmax":
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, block_sizes=blocks, backend="gpu",
                                           interpret=interpret)
  if impl == "pallas_sigmoid":  # FlashSigmoid: unnormalised sigmoid, b = -log n, no running statistics
    return lambda q, k, v: flash_attention(q, k, v, score="sigmoid", causal=causal, block_sizes=blocks,
                                           backend="gpu", interpret=interpret)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(args) -> dict:
  dry = args.dry_run
  device = jax.devices()[0]
  if not dry and device.platform != "gpu":
    raise SystemExit(f"flash_gpu.py needs an NVIDIA GPU (found {device.platform}); use --dry-run on CPU")
  lengths = [64, 128] if dry else args.lengths
  head_dims = [16] if dry else args.head_dims
  impls = [i for i in args.impls if not (dry and i == "cudnn")]
  results = []
  for causal in args.causal:
    for d in head_dims:
      for n in lengths:
        heads = 2 if dry else args.width // d
        batch = 1 if dry else max(1, args.tokens // n)
        blocks = BlockSizes(min(args.block_q, n), min(args.block_kv, n), num_warps=4 if d <= 64 else 8,
                            num_stages=args.num_stages)
        keys = jax.random.split(jax.random.key(0), 3)
        q, k, v = (jax.random.normal(kk, (batch, n, heads, d), jnp.bfloat16) for kk in keys)
        flops_fwd = 4 * batch * heads * n * n * d * (0.5 if causal else 1.0)
        for impl in impls:
          if impl in CAUSAL_ONLY and not causal:
            continue
          fn = _attention_fn(impl, causal, blocks, interpret=dry, n=n, heads=heads, head_dim=d)
          loss = lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32))
          row = dict(impl=impl, causal=causal, n=n, head_dim=d, heads=heads, batch=batch,
                     blocks=[blocks.block_q, blocks.block_kv], num_warps=blocks.num_warps)
          try:
            t_fwd = _time(jax.jit(fn), (q, k, v), args.repeats)
            t_all = _time(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v), args.repeats)
            row.update(fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_all, fwd_tflops=flops_fwd / t_fwd / 1e12,
                       fwd_bwd_tflops=3.5 * flops_fwd / t_all / 1e12)
          except Exception as e:  # e.g. XLA out of memory at 32k, cuDNN not available for a shape
            row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
          stats = device.memory_stats() or {}
          row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
          print(json.dumps(row), flush=True)
          results.append(row)
  return dict(
      benchmark="flash_gpu", hardware=device.device_kind, platform=device.platform, jax=jax.__version__,
      host=platform.node(), dtype="bfloat16", dry_run=dry,
      note=("DRY RUN on CPU in Pallas interpret mode: checks the script only, these are NOT performance numbers"
            if dry else "median of %d timed runs after one warm-up; flops fwd+bwd = 3.5x fwd" % args.repeats),
      results=results)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
  p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
  p.add_argument("--causal", type=lambda s: s.lower() == "true", nargs="+", default=[True])
  p.add_argument("--width", type=int, default=2048, help="heads * head_dim")
  p.add_argument("--tokens", type=int, default=16384, help="batch * n")
  p.add_argument("--block-q", type=int, default=128)
  p.add_argument("--block-kv", type=int, default=64)
  p.add_argument("--num-stages", type=int, default=3)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--dry-run", action="store_true")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  if args.dry_run:
    args.repeats = 1
  report = run(args)
  name = "cpu_dry_run" if args.dry_run else report["hardware"].lower().replace(" ", "_")
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"flash_gpu_{name}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(report, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
