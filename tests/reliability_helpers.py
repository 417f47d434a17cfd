"""Shared by the reliability, bad-input and fault-injection tests: the tiny run, CLI in a subprocess, file
corruption."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments/smoke_tiny.gin")


def metrics_steps(workdir: str) -> list[int]:
  """The steps of the loss rows of ``metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def metrics_losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def largest_array_file(workdir: str, step: int) -> str:
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize)


def flip_bit(path: str, where: float = 0.5, bit: int = 4) -> None:
  data = bytearray(open(path, "rb").read())
  data[int(len(data) * where)] ^= 1 << bit
  open(path, "wb").write(bytes(data))


def overwrite(path: str, where: float = 0.5, n: int = 64) -> None:
  data = bytearray(open(path, "rb").read())
  i = int(len(data) * where)
  data[i:i + n] = bytes(n)
  open(path, "wb").write(bytes(data))


def cli_env(**extra) -> dict:
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)


def cli(args: list[str], *, timeout: float = 300, env: dict | None = None, cwd: str = ROOT):
  """Runs ``attnlab`` in a subprocess; returns the CompletedProcess (text)."""
  return subprocess.run([sys.executable, "-m", "attnlab.cli", *args], cwd=cwd, env=env or cli_env(),
                        capture_output=True, text=True, timeout=timeout)


def popen(args: list[str], *, env: dict | None = None):
  return subprocess.Popen([sys.executable, "-m", "attnlab.cli", *args], cwd=ROOT, env=env or cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
