"""Brief CPU trainings of the landmark / meta-token experiments and their baselines -> one results JSON.

Runs (each ``attnlab train`` in its own workdir under ``--runs_dir``, skipped when its eval.json exists):

* passkey: ``experiments/landmark_passkey_tiny.gin`` vs ``experiments/passkey_tiny.gin`` (softmax), trained at
  256 tokens, passkey accuracy at 256 / 512 / 1024 (landmark: chunked top-k retrieval; softmax: one forward);
* length generalisation: ``experiments/meta_tokens_tiny.gin`` vs ``experiments/base_tiny.gin``, trained at 128
  bytes of the embedded corpus, held-out bits-per-byte at 1x / 2x / 4x.

    PYTHONPATH=. python benchmarks/landmark_meta.py --runs_dir /tmp/runs --passkey_steps 400 --lm_steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

RUNS = {
    "passkey_landmark": ("experiments/landmark_passkey_tiny.gin", "passkey_steps"),
    "passkey_softmax": ("experiments/passkey_tiny.gin", "passkey_steps"),
    "lm_meta_tokens": ("experiments/meta_tokens_tiny.gin", "lm_steps"),
    "lm_softmax": ("experiments/base_tiny.gin", "lm_steps"),
}


def run(name, gin_file, steps, runs_dir) -> dict:
  workdir = os.path.join(runs_dir, name)
  cmd = [sys.executable, "-m", "attnlab.cli", "train", "--gin_file", gin_file, f"--gin.TrainConfig.steps={steps}",
         "--gin.TrainConfig.progress=False", "--gin.TrainConfig.eval_every=0", "--workdir", workdir]
  wall = None
  if not os.path.exists(os.path.join(workdir, "eval.json")):
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
  with open(os.path.join(workdir, "eval.json")) as f:
    ev = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  last = [m for m in metrics if "loss" in m][-1]
  out = {"command": " ".join(["attnlab", *cmd[3:]]), "steps": last["step"], "final_train_loss": last["loss"],
         "tokens_per_s_last": last.get("tokens_per_s"), "wall_s_incl_compile_and_eval": wall}
  if "passkey" in ev:
    out["passkey"] = ev["passkey"]
  out["length_extrapolation"] = ev["length_extrapolation"]
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs_dir", required=True)
  p.add_argument("--passkey_steps", type=int, default=400)
  p.add_argument("--lm_steps", type=int, default=400)
  p.add_argument("--only", nargs="*", choices=sorted(RUNS), default=sorted(RUNS))
  p.add_argument("--out", default="benchmarks/results/landmark_meta_cpu.json")
  args = p.parse_args()
  results = {}
  if os.path.exists(args.out):
    with open(args.out) as f:
      results = json.load(f).get("runs", {})
  for name in args.only:
    gin_file, steps_arg = RUNS[name]
    results[name] = run(name, gin_file, getattr(args, steps_arg), args.runs_dir)
  doc = {"hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} vCPUs (shared), CPU only",
         "note": ("Tiny models trained briefly on a shared 2-vCPU machine while other jobs ran: throughput and wall "
                  "times are noisy; accuracies are from few examples (EvalConfig.passkey_examples) and one seed."),
         "runs": results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(doc, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
