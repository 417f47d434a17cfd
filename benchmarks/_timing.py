"""Shared by the CPU benchmarks: compile once, read XLA's memory analysis, time repeated calls after a warm-up."""

from __future__ import annotations

import time

import jax


def compile_and_time(fn, args, repeats: int, run: bool = True) -> dict:
  """``fn`` (a jitted function) compiled for ``args``: XLA temp/argument/output bytes and, when ``run``, the
  wall-clock seconds of ``repeats`` calls after one warm-up call (``times``)."""
  compiled = fn.lower(*args).compile()
  mem = compiled.memory_analysis()
  out = dict(temp_bytes=int(mem.temp_size_in_bytes), argument_bytes=int(mem.argument_size_in_bytes),
             output_bytes=int(mem.output_size_in_bytes), times=[])
  if run:
    jax.block_until_ready(compiled(*args))
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      out["times"].append(time.perf_counter() - t0)
  return out


def rotated_rounds(names, repeats: int, run) -> dict[str, list[float]]:
  """Wall-clock seconds of ``run(name, round)`` for every name in each of ``repeats`` rounds (``run`` must block
  until its work is done). The order rotates by one each round, so that no call always runs in the same position
  (e.g. right after the dense n x n path, which frees large temporaries): an order effect is spread over all calls
  instead of being charged to one of them every round."""
  names = list(names)
  times = {name: [] for name in names}
  for r in range(repeats):
    shift = r % len(names)
    for name in names[shift:] + names[:shift]:
      t0 = time.perf_counter()
      run(name, r)
      times[name].append(time.perf_counter() - t0)
  return times
