"""Regenerates README.md's speed tables from benchmarks/results/*.json (the block between the speed markers).

    PYTHONPATH=. python benchmarks/readme_tables.py [--readme README.md] [--check]

Reads blocked_cpu.json (blocked vs dense softmax, memory), dense_chunks_cpu.json (the dense path's batch chunks),
efficient_vs_softmax_cpu.json (every efficient variant against both softmax baselines) and
train_throughput_cpu.json (training step vs a plain NNX baseline), and rewrites the text between ``<!-- speed:begin -->`` and ``<!-- speed:end -->``. ``--check`` exits 1 if the README is stale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from attnlab.attention.dispatch import BLOCKED_CPU_MIN_LEN

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"


def _load(name: str):
  path = os.path.join(RESULTS, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _mib(b) -> str:
  return f"{b / 2**20:,.0f}" if b >= 2**20 else f"{b / 2**20:.1f}"


def _n(n: int) -> str:
  return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


def _s(x) -> str:
  return "—" if x is None else (f"{x:.3f}" if x < 1 else f"{x:.2f}")


def _x(x) -> str:
  return "—" if x is None else f"{x:.2f}×"


def _machine(m: dict) -> str:
  return f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} vCPUs, jax {m.get('jax', '?')}"


def blocked_section(r: dict) -> list[str]:
  c = r["config"]
  out = [f"**Softmax baselines** (`benchmarks/blocked_cpu.py` → `benchmarks/results/blocked_cpu.json`; "
         f"{_machine(r['machine'])}; fwd+bwd, causal, f32, batch 1, {c['heads']} heads, d {c['head_dim']}, median "
         f"of {c['repeats']} interleaved rounds; load average given per row: the machine was shared):", "",
         "| n | dense s | blocked s | blocked / dense | naive einsum s | block (q × kv) | load (1 min) |",
         "|---|---|---|---|---|---|---|"]
  for row in r["rows"]:
    block = " × ".join(map(str, row["block"]))
    out.append(f"| {_n(row['n'])} | {_s(row['dense']['median_s'])} | {_s(row['blocked']['median_s'])} | "
               f"{row['blocked_over_dense']:.2f} | {_s(row['naive']['median_s'])} | {block} | "
               f"{row['load_avg_1m'][0]:.1f} |")
  sm = r["summary"]
  out += ["", "| n | dense temp MiB | blocked temp MiB |", "|---|---|---|"]
  for row in r["memory"]:
    out.append(f"| {_n(row['n'])} | {_mib(row['dense_temp_bytes'])} | {_mib(row['blocked_temp_bytes'])} |")
  growth = ", ".join(f"{g:.2f}×" for g in sm["blocked_temp_growth_per_doubling"])
  out += ["", f"Blocked temporaries per doubling of n: {growth} (linear; dense: 4× per doubling). In this run "
          f"blocked was faster than dense from n = {sm['crossover_n']} on; `impl=\"auto\"` on CPU switches to "
          f"blocked from `BLOCKED_CPU_MIN_LEN` = {BLOCKED_CPU_MIN_LEN} keys. Blocked / dense at n = 2k: "
          f"{sm['blocked_over_dense_at_2048']:.2f} (target ≤ {sm['target_blocked_over_dense_at_2048']})."]
  return out


def dense_chunks_section(r: dict) -> list[str]:
  c = r["config"]
  out = [f"**Dense path in batch chunks** (`benchmarks/dense_chunks_cpu.py` → "
         f"`benchmarks/results/dense_chunks_cpu.json`; {_machine(r['machine'])}; fwd+bwd, causal softmax, f32, "
         f"{c['heads']} heads, d {c['head_dim']}, median of {c['repeats']} interleaved rounds). `attend(impl=\"xla\")` "
         "on CPU runs the batch in chunks under `lax.map`, each recomputed in the backward pass; speed-up = "
         "whole-batch time / chunked time in the same rounds:", "",
         "| batch × n | whole batch s | chunks picked (sequences) | speed-up | best chunk: speed-up | "
         "temp MiB (whole / picked) | blocked path: speed-up | load (1 min) |", "|---|---|---|---|---|---|---|---|"]
  label = lambda name: name.removeprefix("chunk_")  # "chunk_2" -> "2"; "whole" stays
  for row in r["rows"]:
    sp, temp = row["speedup_over_whole"], row["temp_bytes"]
    picked, best = row["policy"], row["best"]
    out.append(f"| {row['batch']} × {_n(row['n'])} | {_s(row['median_s']['whole'])} | {label(picked)} | "
               f"{sp[picked]:.2f}× | {label(best)}: {sp[best]:.2f}× | {_mib(temp['whole'])} / {_mib(temp[picked])} "
               f"| {sp['blocked']:.2f}× | {row['load_avg_1m'][0]:.1f} |")
  return out


VARIANT_NAMES = {"lightning": "lightning (chunked)", "cca": "CCA (blocked core)", "cca_xla": "CCA (fused rows)",
                 "routing": "routing (nearest, chunks)", "routing_blocked": "routing (nearest, blocked core)"}


def efficient_section(r: dict) -> list[str]:
  c = r["config"]
  cca = c["cca"]
  out = [f"**Efficient variants against both softmax baselines** (`benchmarks/efficient_vs_softmax.py` → "
         f"`benchmarks/results/efficient_vs_softmax_cpu.json`; fwd+bwd, b 1, {c['heads']} heads, d "
         f"{c['head_dim']}, f32; CCA g {cca['group_size']}, s {cca['window_size']}; one run, interleaved, median "
         f"of {c['repeats']}). Speed-up = softmax time / variant time; the fair baseline for an O(n)-memory "
         "method is the blocked softmax:", "",
         "| n | variant | s | vs blocked softmax | vs dense softmax | temp MiB (blocked / dense softmax) |",
         "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    for v, name in VARIANT_NAMES.items():
      x = row[v]
      out.append(f"| {_n(row['n'])} | {name} | {_s(x.get('median_s'))} | "
                 f"{_x(x.get('speedup_vs_softmax_blocked'))} | {_x(x.get('speedup_vs_softmax_dense'))} | "
                 f"{_mib(x['temp_bytes'])} ({_mib(row['softmax_blocked']['temp_bytes'])} / "
                 f"{_mib(row['softmax_dense']['temp_bytes'])}) |")
  out += ["", "Blocked / dense softmax seconds per row: " + "; ".join(
      f"{_n(row['n'])}: {_s(row['softmax_blocked'].get('median_s'))} / "
      f"{_s(row['softmax_dense'].get('median_s')) if 'median_s' in row['softmax_dense'] else 'not timed'}"
      for row in r["rows"]) + "."]
  return out


def _load_range(loads) -> str:
  return f"{min(loads):.1f}–{max(loads):.1f}"


def train_section(r: dict) -> list[str]:
  if "variants" not in r:
    return []
  out = [f"**Training step** (`benchmarks/train_throughput.py` → `benchmarks/results/train_throughput_cpu.json`; "
         f"{r.get('hardware', '')}): d_model {r['model']['d_model']}, {r['model']['num_layers']} layers, seq "
         f"{r['model']['seq_len']}, batch {r['model']['batch']}; {len(next(iter(r['variants'].values()))['all_s'])} "
         f"interleaved rounds, load average {_load_range(r['load_avg_1m'])}; speed-up = median over rounds of "
         "baseline time / step time in the same round, with its range).", "",
         "| step | s/step (median) | tokens/s | MFU (vs matmul peak of this run) | vs plain NNX (range) |",
         "|---|---|---|---|---|"]
  for name, x in r["variants"].items():
    lo, hi = x["speedup_range"]
    out.append(f"| {name} | {x['step_s']:.3f} | {x['tokens_per_s']:,.0f} | {x['mfu']:.0%} | "
               f"{x['speedup_vs_baseline']:.2f}× ({lo:.2f}–{hi:.2f}) |")
  s = r["summary"]
  out += ["", f"Matmul peak {r['matmul_peak_gflops']['best']:.0f} GFLOP/s (2048² f32, same run). Best f32 attnlab "
          f"step ({s['best_attnlab']}) vs the f32 plain NNX baseline: {s['speedup_vs_baseline']:.2f}× (target 1.3×); "
          f"MFU {s['mfu']:.0%} (target 70 %). " + s.get("verdict", "") + " " + s["bf16_note"]]
  c = r.get("ceiling_summary")
  if c:
    out += ["", f"Ceiling (the baseline's matmuls alone: attention replaced by q + k + v, no norms, no RoPE): "
            f"{c['ceiling_speedup_vs_baseline']:.2f}× the baseline, MFU {c['ceiling_mfu']:.0%}; the speed target "
            f"lies {'below' if c['speedup_target_below_ceiling'] else 'above'} it, the MFU target "
            f"{'below' if c['mfu_target_below_ceiling'] else 'above'} it."]
  return out


def render() -> str:
  lines = ["<!-- generated by benchmarks/readme_tables.py from benchmarks/results/*.json; do not edit by hand -->"]
  for name, section in (("blocked_cpu.json", blocked_section), ("dense_chunks_cpu.json", dense_chunks_section),
                        ("efficient_vs_softmax_cpu.json", efficient_section),
                        ("train_throughput_cpu.json", train_section)):
    r = _load(name)
    if r is not None:
      body = section(r)
      if body:
        lines += [""] + body
  return "\n".join(lines) + "\n"


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--readme", default=os.path.join(os.path.dirname(HERE), "README.md"))
  p.add_argument("--check", action="store_true")
  a = p.parse_args()
  with open(a.readme) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    sys.exit(f"{a.readme} has no {BEGIN} ... {END} block")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  new = head + BEGIN + "\n" + render() + END + tail
  if a.check:
    sys.exit(0 if new == text else 1)
  with open(a.readme, "w") as f:
    f.write(new)
  print("updated", a.readme)


if __name__ == "__main__":
  main()
