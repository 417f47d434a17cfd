"""The ``attnlab`` CLI end to end on the smoke config: outputs, resume, refusal, eval, errors."""

import json
import os

import numpy as np
import pytest

from attnlab import generate
from attnlab.app import load
from attnlab.cli import main
from attnlab.data.tokenizer import make_tokenizer

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


def test_generate_command_continues_the_prompt_as_the_library_does(workdir, capsys):
  model, cfg = load(workdir)
  tokenizer = make_tokenizer(cfg.data.tokenizer)
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode("The ")]).astype(np.int32)
  expected = "The " + tokenizer.decode(np.asarray(generate(model, ids, 5)[0]).tolist())
  for cache in ("full", "window:8"):
    assert main(["generate", "--workdir", workdir, "--prompt", "The ", "--max_new_tokens", "5", "--cache", cache]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ")
    if cache == "full":
      assert out == expected + "\n"
  assert main(["generate", "--workdir", workdir, "--max_new_tokens", "5"]) != 0
  assert "--prompt" in capsys.readouterr().err
  assert main(["generate", "--workdir", workdir, "--prompt", "x", "--cache", "sink:4"]) != 0
  assert "sink" in capsys.readouterr().err
