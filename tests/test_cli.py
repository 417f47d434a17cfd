"""The ``attnlab`` CLI end to end on the smoke config: outputs, resume, refusal, eval, errors."""

import json
import os

import pytest

from attnlab.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "experiments/smoke_tiny.gin")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("cli") / "run")
  assert main(["train", "--gin_file", SMOKE, "--workdir", d, "--gin.TrainConfig.steps=4"]) == 0
  return d


def test_train_leaves_every_artifact(workdir):
  files = set(os.listdir(workdir))
  assert {"config.gin", "operative_config.gin", "metrics.jsonl", "tensorboard", "checkpoints", "eval.json",
          "length_extrapolation.png"} <= files
  config = open(os.path.join(workdir, "config.gin")).read()
  assert "TrainConfig.steps = 4" in config and "ModelConfig.d_model = 32" in config
  assert "OptimizerConfig.b1 = 0.9" in open(os.path.join(workdir, "operative_config.gin")).read()
  assert json.load(open(os.path.join(workdir, "eval.json")))["step"] == 4


def test_rerun_resumes_and_other_config_is_refused(workdir, capsys):
  assert main(["train", "--gin_file", SMOKE, "--workdir", workdir, "--gin.TrainConfig.steps=4"]) == 0
  assert "finished at step 4" in capsys.readouterr().out
  assert main(["train", "--gin_file", SMOKE, "--workdir", workdir, "--gin.TrainConfig.steps=4",
               "--gin.ModelConfig.d_model=64"]) == 2
  assert "different configuration" in capsys.readouterr().err


def test_eval_command_reads_workdir_config(workdir, capsys):
  os.remove(os.path.join(workdir, "eval.json"))
  assert main(["eval", "--workdir", workdir]) == 0
  assert "| 1x | 32 |" in capsys.readouterr().out
  assert json.load(open(os.path.join(workdir, "eval.json")))["step"] == 4


def test_errors_are_reported(tmp_path, capsys):
  assert main(["train", "--gin_file", SMOKE, "--workdir", str(tmp_path), "--gin.ModelConfig.d_modle=3"]) == 2
  assert "d_modle" in capsys.readouterr().err
  assert main(["train", "--gin_file", SMOKE, "--workdir", str(tmp_path), "--gin.DataConfig.source='text'",
               f"--gin.DataConfig.paths=('{tmp_path}/missing.txt',)"]) == 2
  assert "missing.txt' does not exist" in capsys.readouterr().err
  assert main(["eval", "--workdir", str(tmp_path / "none")]) == 2
