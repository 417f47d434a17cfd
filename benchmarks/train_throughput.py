"""Training throughput and MFU of the d_model 256, 4-layer, seq 256 byte LM against this machine's f32 matmul peak.

    python benchmarks/train_throughput.py [--steps 6] [--batch 16]

MFU = (training FLOPs per step / step time) / peak, where the peak is the best f32 2048² matmul rate measured
here first, and FLOPs per step come from XLA's cost analysis of the compiled step (the analytic 6N + attention
count is reported too). The step is the harness's own (``attnlab.train.step.train_step_fn``): donated state,
no host sync between steps, one fused log-sum-exp loss. Writes benchmarks/results/train_throughput_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnlab.attention.config import AttentionConfig
from attnlab.data.pipeline import DataConfig, make_dataset
from attnlab.model.config import ModelConfig
from attnlab.state import build_state
from attnlab.state.optimizer import OptimizerConfig
from attnlab.train.config import TrainConfig
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.metrics import matmul_flops_per_token
from attnlab.train.step import train_step_fn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_throughput_cpu.json")


def matmul_peak(n: int = 2048, repeats: int = 8) -> tuple[float, float]:
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / min(times), 2 * n ** 3 / float(np.median(times))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=6)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  args = ap.parse_args()

  cfg = ExperimentConfig(
      model=ModelConfig(d_model=256, num_layers=4, attention=AttentionConfig(num_heads=4), max_seq_len=args.seq),
      data=DataConfig(seq_len=args.seq, batch_size=args.batch), optimizer=OptimizerConfig(warmup_steps=10),
      train=TrainConfig(steps=1000))
  peak_best, peak_median = matmul_peak()
  graphdef, _, state = build_state(cfg)
  step = train_step_fn(graphdef, cfg.optimizer, cfg.train.steps, 0.0, 1)
  data = make_dataset(cfg.data)
  batches = [jax.device_put({k: v for k, v in next(data).items()}) for _ in range(args.steps + 2)]

  t = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla_flops = float(cost.get("flops", 0.0))
  tokens = args.batch * args.seq
  analytic = matmul_flops_per_token(state["params"], cfg.model, args.seq) * tokens

  for b in batches[:2]:  # warm-up
    state, m = step(state, b)
  jax.block_until_ready(m)
  times = []
  for b in batches[2:]:
    t = time.perf_counter()
    state, m = step(state, b)
    jax.block_until_ready(m)  # per-step timing (the training loop itself does not sync every step)
    times.append(time.perf_counter() - t)
  t = time.perf_counter()
  for b in batches[2:]:  # pipelined: no sync between steps, as in the loop
    state, m = step(state, b)
  jax.block_until_ready(m)
  pipelined = (time.perf_counter() - t) / args.steps

  best, median = min(min(times), pipelined), float(np.median(times))
  flops = xla_flops or analytic
  result = {
      "model": {"d_model": 256, "num_layers": 4, "num_heads": 4, "seq_len": args.seq, "batch": args.batch,
                "mlp": "swiglu", "params": int(sum(x.size for x in jax.tree.leaves(state["params"])))},
      "matmul_peak_gflops": {"best": peak_best / 1e9, "median": peak_median / 1e9, "size": 2048},
      "compile_s": compile_s,
      "step_s": {"best": best, "median": median, "pipelined_mean": pipelined, "all": times},
      "tokens_per_s": {"best": tokens / best, "median": tokens / median},
      "flops_per_step": {"xla_cost_analysis": xla_flops, "analytic_6N_plus_attention": analytic},
      "mfu": {"best_vs_best_peak": flops / best / peak_best, "median_vs_best_peak": flops / median / peak_best,
              "median_vs_median_peak": flops / median / peak_median},
      "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} vCPU, jax {jax.__version__} "
                  f"{jax.devices()[0].platform}",
      "note": "Cloud vCPUs are noisy (the 2048^2 matmul peak itself varied 97-200 GFLOP/s between days): both best "
              "and median are given, and the peak is measured in the same run. MFU uses XLA's FLOP count of the whole "
              "step (forward, backward, AdamW).",
  }
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w") as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: result[k] for k in ("matmul_peak_gflops", "step_s", "tokens_per_s", "mfu")}, indent=1))


if __name__ == "__main__":
  main()
