"""Fault injection: each case asserts nothing lost and an identical loss curve, or a clear stop.

Fast (in-process, one shared 8-step run): damaged checkpoint files (truncated, overwritten, emptied, a flipped bit,
a garbled or missing checksum record) -> quarantine and fallback, or unverified restore of a pre-checksum
checkpoint; a NaN injected mid-run -> a clear stop naming the last finite checkpoint.

Slow (``@pytest.mark.slow``, real ``attnlab`` processes): kill -9 at random moments including while an
asynchronous checkpoint is being written; SIGTERM/SIGINT at every phase (``ATTNLAB_FAILPOINT``); a peer killed
in a 2-process run and a peer that never starts."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import time
import warnings

import jax
import jax.numpy as jnp
import pytest

from attnlab.configs import build_experiment, parse_gin
from attnlab.state import Checkpointer, build_state
from attnlab.train import loop
from attnlab.train.loop import NonFiniteLossError, train
from tests.reliability_helpers import (SMOKE, cli, cli_env, flip_bit, largest_array_file, metrics_losses,
                                       metrics_steps, overwrite, popen)


@pytest.fixture(scope="module")
def cfg():
  parse_gin([SMOKE], ["TrainConfig.eval_at_end = False"])
  return build_experiment()  # 8 steps, checkpoints at 4 and 8


@pytest.fixture(scope="module")
def run(cfg, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("faults") / "run")
  return d, train(cfg, d)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path):
  open(path, "wb").close()


DAMAGE = {
    "truncated": lambda d: _truncate(largest_array_file(d, 8)),
    "overwritten_64_bytes": lambda d: overwrite(largest_array_file(d, 8), 0.3),
    "emptied": lambda d: _empty(largest_array_file(d, 8)),
    "bit_flip_early": lambda d: flip_bit(largest_array_file(d, 8), 0.05, 0),
    "bit_flip_late": lambda d: flip_bit(largest_array_file(d, 8), 0.95, 7),
    "garbled_checksum_record": lambda d: open(os.path.join(d, "checksums", "8.json"), "w").write("{ torn"),
    "metadata_zeroed": lambda d: open(os.path.join(d, "checkpoints", "8", "state", "_METADATA"), "wb").write(
        bytes(64)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_quarantined(cfg, run, tmp_path, damage):
  d = str(tmp_path / "run")
  shutil.copytree(run[0], d)
  DAMAGE[damage](d)
  _, _, like = build_state(cfg)
  ckpt = Checkpointer(d)
  with pytest.warns(RuntimeWarning, match="checkpoint at step 8 (is corrupt|is unreadable)"):
    step, state, data_state, _ = ckpt.restore_latest(like)
  ckpt.close()
  assert step == 4 and data_state == {"step": 4}
  assert os.path.isdir(os.path.join(d, "corrupt_checkpoints", "8"))
  assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == ["4"]


def test_checkpoint_without_record_restores_unverified(cfg, run, tmp_path):
  d = str(tmp_path / "run")
  shutil.copytree(run[0], d)
  shutil.rmtree(os.path.join(d, "checksums"))  # as written by an older attnlab
  _, _, like = build_state(cfg)
  ckpt = Checkpointer(d)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    step, _, _, _ = ckpt.restore_latest(like)
  ckpt.close()
  assert step == 8


def test_nan_mid_run_is_a_clear_stop(cfg, run, tmp_path, monkeypatch):
  d = str(tmp_path / "run")
  shutil.copytree(run[0], d)
  shutil.rmtree(os.path.join(d, "checkpoints", "8"))
  real = loop.train_step_fn

  def poisoned(*a, **k):
    step = real(*a, **k)

    def wrapped(state, batch):
      if int(state["step"]) == 5:  # the 6th step starts from parameters holding one NaN
        params = jax.tree.map(lambda x: x, state["params"])
        leaf_path = jax.tree_util.tree_leaves_with_path(params)[0][0]
        first = jax.tree_util.tree_leaves(params)[0]
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x.at[(0,) * x.ndim].set(jnp.nan) if p == leaf_path else x, params)
        del first
        state = {**state, "params": params}
      return step(state, batch)

    return wrapped

  monkeypatch.setattr(loop, "train_step_fn", poisoned)
  longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, checkpoint_every=2))
  with pytest.raises(NonFiniteLossError, match=r"at step 6; .*last checkpoint: step 4 \(finite\)"):
    train(longer, d)
  assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == ["4"]  # step 6 was never saved
  assert metrics_steps(d) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------------------------------------------- slow: processes
STEPS = 12
ARGS = ["train", "--gin_file", SMOKE, f"--gin.TrainConfig.steps={STEPS}", "--gin.TrainConfig.checkpoint_every=2",
        "--gin.TrainConfig.eval_at_end=False", "--gin.TrainConfig.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("ref") / "run")
  out = cli([*ARGS, "--workdir", d])
  assert out.returncode == 0, out.stderr[-3000:]
  return metrics_losses(d)


def _wait_for(pred, timeout=180.0, poll=0.05):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return True
    time.sleep(poll)
  return False


def _saving(d):
  ck = os.path.join(d, "checkpoints")
  return os.path.isdir(ck) and any("tmp" in n for n in os.listdir(ck))


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_nothing(reference, tmp_path):
  d = str(tmp_path / "run")
  rng = random.Random(17)
  kills = 0
  for attempt in range(4):
    p = popen([*ARGS, "--workdir", d])
    if attempt == 0:  # while an asynchronous checkpoint write is in flight
      _wait_for(lambda: _saving(d) or p.poll() is not None, poll=0.005)
    else:  # a random moment after the (re)start
      _wait_for(lambda: os.path.exists(os.path.join(d, "metrics.jsonl")) or p.poll() is not None)
      time.sleep(rng.uniform(0.0, 3.0))
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
      kills += 1
    p.communicate(timeout=60)
  out = cli([*ARGS, "--workdir", d])
  assert out.returncode == 0, out.stderr[-3000:]
  assert kills >= 2
  assert metrics_steps(d) == list(range(1, STEPS + 1))  # every step once
  assert metrics_losses(d) == reference  # bit-identical curve


@pytest.mark.slow
@pytest.mark.parametrize("phase, sig", [("config", "TERM"), ("data", "INT"), ("state", "TERM"),
                                        ("restore", "TERM"), ("step", "INT"), ("save", "TERM"), ("eval", "TERM")])
def test_signal_at_each_phase(reference, tmp_path, phase, sig):
  d = str(tmp_path / "run")
  args = [*ARGS, "--workdir", d] + (["--gin.TrainConfig.eval_at_end=True"] if phase == "eval" else [])
  if phase == "restore":  # something to restore first: a run stopped at step 4
    first = cli(args, env=cli_env(ATTNLAB_FAILPOINT="save:TERM:2"))
    assert first.returncode == 0, first.stderr[-3000:]
  nth = "3" if phase in ("step", "save") else "1"
  out = cli(args, env=cli_env(ATTNLAB_FAILPOINT=f"{phase}:{sig}:{nth}"))
  assert out.returncode == 0, out.stderr[-3000:]
  text = out.stdout + out.stderr
  assert "Traceback" not in text and "already exists" not in text
  if phase in ("config", "data", "state"):  # during start-up: nothing written
    assert "during start-up" in text
    assert not os.path.exists(os.path.join(d, "run_config.json"))
    assert not os.path.exists(os.path.join(d, "checkpoints")) or not os.listdir(os.path.join(d, "checkpoints"))
  elif phase == "eval":
    assert metrics_steps(d) == list(range(1, STEPS + 1))
  else:
    saved = sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")))
    assert saved and saved[-1] == metrics_steps(d)[-1]  # a checkpoint of the last completed step
  final = cli([*ARGS, "--workdir", d])
  assert final.returncode == 0, final.stderr[-3000:]
  assert metrics_steps(d) == list(range(1, STEPS + 1))
  assert metrics_losses(d) == reference


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


MP = ["--gin.DataConfig.batch_size=2", "--gin.MeshConfig.data=-1", "--gin.MeshConfig.fsdp=2"]


def _mp_env():
  return cli_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")


@pytest.mark.slow
def test_missing_peer_is_a_clear_stop_within_the_timeout(tmp_path):
  t = time.time()
  out = cli([*ARGS, *MP, "--workdir", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{_free_port()}",
             "--num_processes", "2", "--process_id", "0", "--initialization_timeout", "5"], env=_mp_env(), timeout=120)
  assert out.returncode == 3, out.stderr[-3000:]
  assert "not every one of the 2 processes joined" in out.stderr and "initialization_timeout=5" in out.stderr
  assert "Check failure" not in out.stderr and "Traceback" not in out.stderr
  assert time.time() - t < 60


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_peer_is_a_clear_stop_within_the_timeout(tmp_path, victim):
  d = str(tmp_path / "run")
  port = _free_port()
  procs = [popen([*ARGS, *MP, "--gin.TrainConfig.steps=100000", "--gin.TrainConfig.checkpoint_every=100000",
                  "--workdir", d, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id",
                  str(i), "--heartbeat_timeout", "10"], env=_mp_env()) for i in range(2)]
  try:
    assert _wait_for(lambda: os.path.exists(os.path.join(d, "metrics.jsonl")), timeout=240)
    procs[victim].send_signal(signal.SIGKILL)
    t = time.time()
    survivor = procs[1 - victim]
    out, _ = survivor.communicate(timeout=120)
    elapsed = time.time() - t
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert survivor.returncode == 3, out[-3000:]
  assert f"lost process {victim}" in out, out[-3000:]
  assert "Check failure" not in out and "Traceback" not in out, out[-3000:]
  assert elapsed < 10 + 30, elapsed
