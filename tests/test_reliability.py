"""The eight findings of issue 17, one test each (each failed on the old main):

1. a workdir's config.gin runs no code;          5. a signal on a checkpoint step: one save, rc 0;
2. a non-finite state is never saved;             6. multi-process settings (timeouts, bind address, no coordinator);
3. flipped bits are detected (checksums);         7. the issue's malformed inputs are clear errors (exit 2);
4. good checkpoints are never moved or deleted;  8. a mistake is recoverable (failed start, cadence, metrics).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

from attnlab import cli
from attnlab.cli import main
from attnlab.configs import build_experiment, parse_gin
from attnlab.parallel import distributed
from attnlab.parallel.distributed import DistributedConfig
from attnlab.state import Checkpointer, NoRestorableCheckpointError, build_state
from attnlab.train import stop
from attnlab.train.loop import NonFiniteLossError, RunMismatchError, check_run_record, train
from tests.reliability_helpers import ROOT, SMOKE, flip_bit, largest_array_file, metrics_steps


@pytest.fixture(scope="module")
def cfg():
  parse_gin([SMOKE], ["TrainConfig.eval_at_end = False"])
  return build_experiment()  # 8 steps, checkpoints at 4 and 8


@pytest.fixture(scope="module")
def run(cfg, tmp_path_factory):
  d = str(tmp_path_factory.mktemp("rel") / "run")
  result = train(cfg, d)
  with open(os.path.join(d, "config.gin"), "w") as f:  # as `attnlab train` records it
    f.write("include '%s'\nTrainConfig.eval_at_end = False\n" % SMOKE)
  return d, result


def _copy(run, tmp_path) -> str:
  d = str(tmp_path / "copy")
  shutil.copytree(run[0], d)
  return d


def _error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1, err
  return lines[0]


# 1 -----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("evil", [
    "from __gin__ import dynamic_registration\nimport os\nModelConfig.d_model = @os.system()\n"
    "os.system.command = 'touch {marker}'\n",
    "import os\n",
    "import evil_plugin_rel\n",  # a module that writes the marker when imported
])
def test_1_workdir_config_runs_no_code(run, tmp_path, capsys, evil):
  d = _copy(run, tmp_path)
  marker = tmp_path / "pwned"
  (tmp_path / "evil.gin").write_text(evil.format(marker=marker))
  (tmp_path / "evil_plugin_rel.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  with open(os.path.join(d, "config.gin"), "a") as f:
    f.write(f"include '{tmp_path / 'evil.gin'}'\n")
  for command in ("eval", "sinks", "stream"):
    assert main([command, "--workdir", d, "--gin_search_path", str(tmp_path)]) == 2
    line = _error_line(capsys)
    assert "runs no code" in line and ("dynamic registration" in line or "imports the module" in line), line
  assert not marker.exists() and "evil_plugin_rel" not in __import__("sys").modules


def test_1_workdir_include_imports_no_package(run, tmp_path, capsys):
  """gin reads an ``include 'a/b/x.gin'`` it cannot open as a file as a resource of the package ``a.b``, which
  imports ``a``: a workdir's include must never get there."""
  d = _copy(run, tmp_path)
  marker = tmp_path / "pwned"
  pkg = tmp_path / "evilpkg_inc"
  pkg.mkdir()
  (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
  os.makedirs(os.path.join(d, "evilpkg_inc", "sub"))
  with open(os.path.join(d, "evilpkg_inc", "sub", "x.gin"), "w") as f:
    f.write("TrainConfig.eval_at_end = False\n")
  with open(os.path.join(d, "config.gin"), "a") as f:
    f.write("include 'evilpkg_inc/sub/x.gin'\n")
  main(["eval", "--workdir", d, "--gin_search_path", str(tmp_path)])
  capsys.readouterr()
  assert not marker.exists() and "evilpkg_inc" not in __import__("sys").modules


# 2 -----------------------------------------------------------------------------------------------------------------
def test_2_non_finite_state_is_never_saved(cfg, tmp_path):
  bad = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, learning_rate=1e6, grad_clip=None,
                                                               warmup_steps=0),
                            train=dataclasses.replace(cfg.train, checkpoint_every=1))
  d = str(tmp_path)
  with pytest.raises(NonFiniteLossError) as e:
    train(bad, d)
  saved = sorted(int(s) for s in os.listdir(os.path.join(d, "checkpoints")))
  message = str(e.value)
  named = f"last checkpoint: step {saved[-1]} (finite)" if saved else "last checkpoint: none"
  assert named in message, message
  if saved:  # the checkpoint the message names restores, verified and finite (no quarantine warning)
    _, _, like = build_state(bad)
    ckpt = Checkpointer(d)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      step, state, _, _ = ckpt.restore_latest(like)
    ckpt.close()
    assert step == saved[-1]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# 3 -----------------------------------------------------------------------------------------------------------------
def test_3_flipped_bit_is_detected_and_the_curve_is_identical(cfg, run, tmp_path):
  d = _copy(run, tmp_path)
  flip_bit(largest_array_file(d, 8))
  with pytest.warns(RuntimeWarning, match=r"step 8 is corrupt: array \[.* does not match its recorded checksum"):
    res = train(cfg, d)
  assert [h["step"] for h in res.history] == [5, 6, 7, 8]
  assert [h["loss"] for h in res.history] == [h["loss"] for h in run[1].history[4:]]  # bit-identical
  assert metrics_steps(d) == list(range(1, 9))  # replayed steps are not logged twice
  assert os.path.isdir(os.path.join(d, "corrupt_checkpoints", "8"))


# 4 -----------------------------------------------------------------------------------------------------------------
def test_4_other_configuration_moves_nothing(run, tmp_path, capsys):
  d = _copy(run, tmp_path)
  assert main(["eval", "--workdir", d, "--gin.ModelConfig.d_model=64"]) == 2
  line = _error_line(capsys)
  assert "another configuration" in line and "['params']" in line, line
  assert "checkpoint [32, 32] float32 vs. configured [64, 64]" in line, line
  assert main(["train", "--gin_file", SMOKE, "--workdir", d, "--force", "--gin.ModelConfig.d_model=64",
               "--gin.TrainConfig.eval_at_end=False"]) == 2
  assert "another configuration" in _error_line(capsys)
  assert sorted(os.listdir(os.path.join(d, "checkpoints"))) == ["4", "8"]
  assert not os.path.exists(os.path.join(d, "corrupt_checkpoints"))


def test_4_quarantine_keeps_every_copy_and_no_restore_is_an_error(cfg, run, tmp_path):
  d = _copy(run, tmp_path)
  earlier = os.path.join(d, "corrupt_checkpoints", "8")
  os.makedirs(earlier)
  open(os.path.join(earlier, "first_copy"), "w").close()
  for step in (4, 8):
    flip_bit(largest_array_file(d, step))
  with pytest.warns(RuntimeWarning), pytest.raises(NoRestorableCheckpointError, match="none of the checkpoints"):
    train(cfg, d)
  assert os.path.exists(os.path.join(earlier, "first_copy"))  # never overwritten
  assert sorted(os.listdir(os.path.join(d, "corrupt_checkpoints"))) == ["4", "8", "8.1"]
  assert metrics_steps(d) == list(range(1, 9))  # nothing started over


# 5 -----------------------------------------------------------------------------------------------------------------
def test_5_signal_during_a_checkpoint_step_saves_once(cfg, run, tmp_path, monkeypatch):
  d = _copy(run, tmp_path)
  longer = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=16))  # cadence change: no --force
  real_save = Checkpointer.save

  def save_then_signal(self, step, *a, **k):
    real_save(self, step, *a, **k)
    if step == 12:
      stop.STOP._handle(15, None)  # SIGTERM arrives while step 12 is being checkpointed

  monkeypatch.setattr(Checkpointer, "save", save_then_signal)
  try:
    res = train(longer, d)
  finally:
    stop.STOP.clear()
  assert res.status == "interrupted" and res.step == 12
  assert sorted(os.listdir(os.path.join(d, "checkpoints")), key=int) == ["4", "8", "12"]
  assert metrics_steps(d) == list(range(1, 13))


# 6 -----------------------------------------------------------------------------------------------------------------
def test_6_distributed_start_up_settings(monkeypatch, capsys):
  seen = {}
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
  monkeypatch.setattr(distributed.Watchdog, "start", lambda self: self)
  distributed.initialize(DistributedConfig(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1,
                                           initialization_timeout=7, heartbeat_timeout_seconds=9))
  assert seen["coordinator_bind_address"] == "127.0.0.1:1234"  # never all interfaces
  assert seen["initialization_timeout"] > 7 and seen["heartbeat_timeout_seconds"] > 9  # the watchdog speaks first
  with pytest.raises(ValueError, match="without a coordinator"):
    distributed.initialize(DistributedConfig(num_processes=2, process_id=1))
  assert main(["train", "--gin_file", SMOKE, "--workdir", "/nonexistent/x", "--num_processes", "2",
               "--process_id", "1"]) == 2
  assert "without a coordinator" in _error_line(capsys)


# 7 -----------------------------------------------------------------------------------------------------------------
ISSUE_INPUTS = [  # (extra argv for `train`, what the one error line must name)
    (["--gin.ModelConfig.d_model=0"], "ModelConfig.d_model must be a positive int; got 0"),
    (["--gin.ModelConfig.d_model='abc'"], "ModelConfig.d_model must be an int; got 'abc'"),
    (["--gin.ModelConfig.dtype='float13'"], "ModelConfig.dtype must be one of"),
    (["--gin.ModelConfig.num_layers=0"], "ModelConfig.num_layers must be a positive int; got 0"),
    (["--gin.TrainConfig.keep_checkpoints=0"], "TrainConfig.keep_checkpoints must be a positive int; got 0"),
    (["--gin.TrainConfig.eval_every=-1"], "TrainConfig.eval_every must be a non-negative int; got -1"),
    (["--coordinator", "localhost"], "must look like host:port"),
    (["--gin.ModelConfig.vocab_size=100"], "ModelConfig.vocab_size (100)"),
    (["--gin.DataConfig.d_model=1"], "DataConfig.d_model"),
    (["--gin.ModelConfig.d_model="], "empty value"),
]


@pytest.mark.parametrize("extra, named", ISSUE_INPUTS, ids=[a[0] for a, _ in ISSUE_INPUTS])
def test_7_issue_inputs_are_clear_usage_errors(tmp_path, capsys, extra, named):
  assert main(["train", "--gin_file", SMOKE, "--workdir", str(tmp_path / "w"), *extra]) == 2
  assert named in _error_line(capsys)
  assert not os.path.exists(tmp_path / "w" / "run_config.json")


def test_7_data_path_string_is_one_path(tmp_path, capsys):
  assert main(["train", "--gin_file", SMOKE, "--workdir", str(tmp_path / "w"), "--gin.DataConfig.source='text'",
               f"--gin.DataConfig.paths='{tmp_path}/corpus.txt'"]) == 2
  assert f"dataset file '{tmp_path}/corpus.txt' does not exist" in _error_line(capsys)


def test_7_workdir_that_is_a_file(tmp_path, capsys):
  f = tmp_path / "file"
  f.write_text("x")
  for argv in (["eval", "--workdir", str(f)], ["train", "--gin_file", SMOKE, "--workdir", str(f)]):
    assert main(argv) == 2
    assert "is not a directory" in _error_line(capsys)


# 8 -----------------------------------------------------------------------------------------------------------------
def test_8_failed_start_leaves_nothing_and_mismatch_names_fields(cfg, run, tmp_path, capsys):
  w = tmp_path / "w"
  assert main(["train", "--gin_file", SMOKE, "--workdir", str(w), "--gin.DataConfig.source='text'",
               f"--gin.DataConfig.paths=('{tmp_path}/missing.txt',)"]) == 2
  assert "missing.txt' does not exist" in _error_line(capsys)
  assert not any(os.path.exists(w / f) for f in ("run_config.json", "run_config.txt", "config.gin", "checkpoints"))
  check_run_record(str(w), cfg)  # the corrected rerun is not blocked
  other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=1, steps=3, log_every=5),
                              model=dataclasses.replace(cfg.model, norm="layernorm"))
  with pytest.raises(RunMismatchError) as e:
    check_run_record(run[0], other)
  assert "train.seed: 0 -> 1" in str(e.value) and "model.norm: 'rmsnorm' -> 'layernorm'" in str(e.value)
  assert "steps" not in str(e.value) and "log_every" not in str(e.value)  # cadence is not a different run
  check_run_record(run[0], dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=400, eval_every=7,
                                                                              checkpoint_every=3, log_every=2)))
