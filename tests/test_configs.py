"""Every experiments/*.gin parses and builds (model + data + optimizer); config errors name the problem."""

import glob
import os

import jax
import pytest

from attnlab.configs import ConfigError, build_experiment, parse_gin
from attnlab.data.pipeline import make_dataset
from attnlab.state import build_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.gin")))


def test_there_are_experiments():
  names = {os.path.basename(f) for f in GIN_FILES}
  assert {"base_tiny.gin", "demo.gin", "score_relu.gin", "sink_logit.gin", "gate_headwise.gin"} <= names


@pytest.mark.parametrize("path", GIN_FILES, ids=os.path.basename)
def test_experiment_builds(path):
  parse_gin([path])
  cfg = build_experiment()
  _, _, state = build_state(cfg)
  assert jax.tree.leaves(state["params"]) and jax.tree.leaves(state["opt_state"])
  batch = next(make_dataset(cfg.data))
  assert batch["inputs"].shape == (cfg.data.batch_size, cfg.data.seq_len)


def test_bindings_override_files_and_score_params():
  parse_gin([os.path.join(ROOT, "experiments/score_sigmoid_b0.gin")], ["ModelConfig.d_model = 64"])
  cfg = build_experiment()
  assert cfg.model.d_model == 64 and cfg.model.attention.score == "sigmoid"
  assert cfg.model.attention.score_kwargs == {"b": 0.0}


def test_unknown_binding_is_named():
  with pytest.raises(ConfigError, match="d_modle"):
    parse_gin([], ["ModelConfig.d_modle = 3"])
  with pytest.raises(ConfigError, match="NoSuchConfig"):
    parse_gin([], ["NoSuchConfig.x = 3"])
  with pytest.raises(ConfigError, match="does not exist"):
    parse_gin(["experiments/nope.gin"])


def test_missing_required_value_is_named():
  with pytest.raises(ConfigError, match="DataConfig.seq_len.*REQUIRED"):
    parse_gin([os.path.join(ROOT, "experiments/base_tiny.gin")], ["DataConfig.seq_len = %gin.REQUIRED"])
    build_experiment()


def test_sequence_length_beyond_model_is_refused():
  parse_gin([os.path.join(ROOT, "experiments/base_tiny.gin")], ["DataConfig.seq_len = 4096"])
  with pytest.raises(ConfigError, match="max_seq_len"):
    build_experiment()


def test_unused_bindings_warn():
  parse_gin([os.path.join(ROOT, "experiments/base_tiny.gin")], ["PasskeyConfig.digits = 3"])
  with pytest.warns(UserWarning, match="PasskeyConfig.digits"):
    build_experiment()
