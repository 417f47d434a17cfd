"""Training loop: bit-exact resume, NaN stop, corrupted-checkpoint fallback, SIGTERM save, loss pieces."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnlab.configs import build_experiment, parse_gin
from attnlab.state import build_state
from attnlab.state.optimizer import OptimizerConfig, learning_rate_schedule, weight_decay_mask
from attnlab.train.loop import NonFiniteLossError, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cfg():
  parse_gin([os.path.join(ROOT, "experiments/smoke_tiny.gin")], ["TrainConfig.eval_at_end = False"])
  return build_experiment()  # 8 steps, checkpoints at 4 and 8


@pytest.fixture(scope="module")
def full_run(cfg, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("full"))
  return d, train(cfg, d)


def test_resume_is_bit_identical(cfg, full_run, tmp_path):
  _, full = full_run
  d = str(tmp_path)
  half = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4))
  # same LR schedule horizon as the full run, so the first half is the same computation
  half = dataclasses.replace(half, optimizer=dataclasses.replace(cfg.optimizer, decay_steps=8))
  full_cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, decay_steps=8))
  first = train(half, d)
  second = train(full_cfg, d, force=True)  # the recorded config differs only in steps
  assert [h["step"] for h in second.history] == [5, 6, 7, 8]
  losses = [h["loss"] for h in first.history + second.history]
  assert losses == [h["loss"] for h in full.history]  # exact float equality
  assert second.step == 8


def test_metrics_and_checkpoints_written(full_run):
  d, res = full_run
  rows = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(rows[0])
  assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == ["4", "8"]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(d, "tensorboard")))
  assert res.status == "finished" and np.isfinite(res.history[-1]["loss"])


def test_rerun_finished_is_noop_and_other_config_refused(cfg, full_run):
  d, _ = full_run
  again = train(cfg, d)
  assert again.step == 8 and again.history == []
  other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1))
  with pytest.raises(ValueError, match="different configuration"):
    train(other, d)


def test_corrupted_latest_checkpoint_falls_back(cfg, full_run, tmp_path):
  import shutil
  src, _ = full_run
  d = str(tmp_path / "run")
  shutil.copytree(src, d)
  state_dir = os.path.join(d, "checkpoints", "8", "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.warns(RuntimeWarning, match="step 8 is unreadable"):
    res = train(cfg, d)
  assert res.history[0]["step"] == 5 and res.step == 8  # resumed from step 4, retrained 5..8
  assert os.path.isdir(os.path.join(d, "corrupt_checkpoints", "8"))


def test_nan_loss_stops_without_checkpoint(cfg, tmp_path):
  # an infinite learning rate is refused by OptimizerConfig; 1e38 (near float32's max) blows up within two steps
  bad = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e38,
                                                               grad_clip=None, warmup_steps=0),
                            train=dataclasses.replace(cfg.train, checkpoint_every=1))
  with pytest.raises(NonFiniteLossError, match=r"at step (\d+); .*last checkpoint: (none|step \d+ \(finite\))") as e:
    train(bad, str(tmp_path))
  saved = sorted(int(s) for s in os.listdir(os.path.join(tmp_path, "checkpoints")))
  stopped = int(str(e.value).split(" at step ")[1].split(";")[0])
  assert saved == list(range(1, stopped))  # every step before the non-finite one, none after


def test_sigterm_saves_and_exits(tmp_path):
  d = str(tmp_path / "run")
  cmd = [sys.executable, "-m", "attnlab.cli", "train", "--gin_file", "experiments/smoke_tiny.gin",
         "--workdir", d, "--gin.TrainConfig.steps=100000", "--gin.TrainConfig.checkpoint_every=100000"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(d, "metrics.jsonl")
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  assert "saved a checkpoint" in out and "interrupted" in out
  steps = [int(s) for s in os.listdir(os.path.join(d, "checkpoints"))]
  assert len(steps) == 1 and 0 < steps[0] < 100000


def test_weight_decay_mask_and_schedule(cfg):
  _, _, state = build_state(cfg)
  mask = weight_decay_mask(state["params"], OptimizerConfig())
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert not any(v for k, v in flat.items() if "embed" in k or "norm" in k)
  assert all(v for k, v in flat.items() if k.endswith("kernel/value"))
  sched = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, final_lr_fraction=0.1), 110)
  assert float(sched(0)) == 0.0 and float(sched(10)) == pytest.approx(1.0)
  assert float(sched(110)) == pytest.approx(0.1)


def test_grad_accumulation_matches_full_batch(cfg):
  from attnlab.data.pipeline import make_dataset
  from attnlab.train.step import train_step_fn
  graphdef, _, state = build_state(cfg)
  batch = jax.device_put({k: v for k, v in next(make_dataset(cfg.data)).items()})
  out = {}
  for accum in (1, 2):
    s = jax.tree.map(jnp.copy, state)
    _, m = train_step_fn(graphdef, cfg.optimizer, cfg.train.steps, 1e-4, accum)(s, batch)
    out[accum] = jax.device_get(m)
  for k in ("loss", "grad_norm", "z_loss"):
    np.testing.assert_allclose(out[1][k], out[2][k], rtol=1e-5)
