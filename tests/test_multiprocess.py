"""A real 2-process run (jax.distributed on 127.0.0.1, gloo collectives) through the CLI: same losses as one
process on the same global batch, an orbax checkpoint written by both processes, resumed by one process on a
different mesh."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from attnlab.configs import build_experiment, parse_gin
from attnlab.parallel import MeshConfig
from attnlab.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# smoke_tiny with 2 steps of a 3-step schedule; per-process batch 2 -> global batch 4.
BINDINGS = ["TrainConfig.steps = 2", "TrainConfig.checkpoint_every = 2", "TrainConfig.eval_at_end = False",
            "OptimizerConfig.decay_steps = 3", "DataConfig.batch_size = 2", "MeshConfig.data = -1",
            "MeshConfig.fsdp = 2"]
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _experiment(extra):
  parse_gin([os.path.join(ROOT, "experiments/smoke_tiny.gin")], BINDINGS + extra)
  return build_experiment()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mp") / "run")
  port = _free_port()
  # 2 processes x 2 CPU devices: mesh data=2 (across processes) x fsdp=2 (within each process).
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  try:
    for i in range(2):
      cmd = [sys.executable, "-m", "attnlab.cli", "train", "--gin_file", "experiments/smoke_tiny.gin",
             "--workdir", workdir, "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
             "--process_id", str(i), *(f"--gin.{b.replace(' = ', '=')}" for b in BINDINGS)]
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True))
    outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:  # nothing outlives the test, whatever happened
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return workdir, outs


def test_two_processes_match_one_and_resume_on_another_mesh(two_process_run):
  workdir, outs = two_process_run
  assert "finished at step 2" in outs[0] and "finished" not in outs[1]  # only process 0 reports
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]  # written once (process 0), not once per process
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir))  # both processes wrote

  # One process, one device, the same global batch of 4, 3 steps: the reference.
  ref = _experiment(["DataConfig.batch_size = 4", "MeshConfig.data = 1", "MeshConfig.fsdp = 1",
                     "TrainConfig.steps = 3", "TrainConfig.checkpoint_every = 3"])
  ref_run = train(ref, os.path.join(os.path.dirname(workdir), "ref"))
  ref_losses = [h["loss"] for h in ref_run.history]
  np.testing.assert_allclose([r["loss"] for r in rows], ref_losses[:2], rtol=1e-5)

  # One process resumes the 2-process checkpoint on a different mesh (data=2 x tensor=2 over 4 of its 8 devices)
  # with the same global batch: the run record matches (it holds the global batch) except for the length.
  resumed = train(dataclasses.replace(ref, mesh=MeshConfig(data=2, tensor=2)), workdir, force=True)
  assert [h["step"] for h in resumed.history] == [3] and resumed.step == 3
  np.testing.assert_allclose(resumed.history[0]["loss"], ref_losses[2], rtol=1e-5)


@pytest.mark.slow
def test_aot_compile_for_a_tpu_topology(tmp_path):
  """``attnlab compile --topology v5e:2x2`` on this CPU machine (needs libtpu: ``pip install 'attnlab[tpu]'``)."""
  import importlib.util
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install 'attnlab[tpu]')")
  cmd = [sys.executable, "-m", "attnlab.cli", "compile", "--topology", "v5e:2x2", "--gin_file",
         "experiments/smoke_tiny.gin", "--gin.MeshConfig.data=1", "--gin.MeshConfig.fsdp=2",
         "--gin.MeshConfig.tensor=2"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "4 devices on 1 host(s)" in out.stdout and "mesh {'data': 1, 'fsdp': 2, 'tensor': 2}" in out.stdout
  assert "temporaries" in out.stdout
