"""Prefill and decode throughput of ``attnlab.generate`` per attention variant (tiny LMs, CPU, float32).

Prefill tokens/s = batch * prompt / t(generate with 1 new token) (the prompt's one jitted call + sampling);
decode tokens/s = batch * (N - 1) / (t(generate N) - t(generate 1)) (N - 1 jitted steps). Each time is the median
of ``--repeats`` (>= 3) runs after a warm-up run that compiles; the load average is recorded because the machine
may be shared. Writes ``benchmarks/results/decode_cpu.json``.

    python benchmarks/decode_cpu.py [--prompt 128] [--new 32] [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

import attnlab
from attnlab.attention.variants.cca import CCAConfig
from attnlab.attention.variants.landmark import LandmarkConfig
from attnlab.attention.variants.lightning import LightningConfig
from attnlab.attention.variants.meta_tokens import MetaTokenConfig
from attnlab.attention.variants.routing import RoutingConfig

VARIANTS = {
    "softmax": (attnlab.AttentionConfig(num_heads=4), "full"),
    "softmax_gqa_sinklogit": (attnlab.AttentionConfig(num_heads=4, num_kv_heads=2, sink_logit=True), "full"),
    "sigmoid": (attnlab.AttentionConfig(num_heads=4, score="sigmoid"), "full"),
    "softmax_window64": (attnlab.AttentionConfig(num_heads=4), "window:64"),
    "softmax_sink4+60": (attnlab.AttentionConfig(num_heads=4), "sink:4+60"),
    "cca": (CCAConfig(num_heads=4, group_size=8, window_size=32, block_q=64), "full"),
    "lightning": (LightningConfig(num_heads=4, block_size=32), "full"),
    "meta_tokens": (MetaTokenConfig(num_heads=4, meta_ids=(258,)), "full"),
    "routing": (RoutingConfig(num_heads=4, num_clusters=4, window=32, local_block=32), "full"),
    "landmark": (LandmarkConfig(num_heads=4, block_size=16, landmark_id=258, top_k=4, cache_blocks=16), "full"),
}


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "decode_cpu.json"))
  args = ap.parse_args()
  if args.repeats < 3:
    raise SystemExit("--repeats must be >= 3")
  prompt = np.random.default_rng(0).integers(0, 256, (args.batch, args.prompt)).astype(np.int32)
  rows = {}
  load_before = os.getloadavg()
  for name, (att, policy) in VARIANTS.items():
    cfg = attnlab.ModelConfig(vocab_size=259, d_model=64, num_layers=2, max_seq_len=512, attention=att)
    model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
    model.eval()
    one = lambda: attnlab.generate(model, prompt, 1, cache_policy=policy)
    many = lambda: attnlab.generate(model, prompt, args.new, cache_policy=policy)
    one(), many()  # compile
    t1, tn = _median_time(one, args.repeats), _median_time(many, args.repeats)
    rows[name] = dict(policy=policy, prefill_tokens_per_s=args.batch * args.prompt / t1,
                      decode_tokens_per_s=args.batch * (args.new - 1) / max(tn - t1, 1e-9),
                      prefill_s=t1, generate_s=tn)
    print(f"{name:24s} {policy:10s} prefill {rows[name]['prefill_tokens_per_s']:9.0f} tok/s   "
          f"decode {rows[name]['decode_tokens_per_s']:7.0f} tok/s", flush=True)
  result = dict(backend=jax.default_backend(), jax=jax.__version__, cpu_count=os.cpu_count(),
                load_average_before=load_before, load_average_after=os.getloadavg(),
                config=dict(d_model=64, num_layers=2, batch=args.batch, prompt=args.prompt, new_tokens=args.new,
                            repeats=args.repeats, dtype="float32"),
                variants=rows)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
