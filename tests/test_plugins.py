"""Plugins from outside the package (t5x style): a user's module, imported by a gin ``import`` line from the working
directory, adds a score function, an attention variant and a synthetic data task; ``attnlab train`` trains it and
``attnlab sinks`` analyses the workdir."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = '''
"""A score function, an attention variant and a data task, registered from outside attnlab."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import attnlab
from attnlab.ops.scores.registry import register_score
from attnlab.attention.variants.dot_product import DotProductAttention
from attnlab.data.synthetic import register_task


@register_score("temp_softmax", params=("temperature",))
def temp_softmax(s, mask, *, temperature=1.0, sink_logits=None, ctx=None):
  """softmax(s / temperature) over the visible keys."""
  del sink_logits, ctx
  return jax.nn.softmax(jnp.where(mask, s / temperature, -jnp.inf), axis=-1)


@dataclasses.dataclass(frozen=True)
class TempSoftmaxConfig(attnlab.AttentionConfig):
  temperature: float = 2.0


@attnlab.register_attention("temp_softmax", TempSoftmaxConfig)
class TempSoftmaxAttention(DotProductAttention):
  def __init__(self, cfg, d_model, **kwargs):
    cfg = dataclasses.replace(cfg, score="temp_softmax", score_params={"temperature": cfg.temperature})
    super().__init__(cfg, d_model, **kwargs)


@dataclasses.dataclass(frozen=True)
class CountingConfig:
  modulus: int = 50


@register_task(CountingConfig)
def counting_row(cfg, rng, seq_len, tokenizer):
  body = 10 + (rng.integers(cfg.modulus) + np.arange(seq_len)) % cfg.modulus
  return np.concatenate([[tokenizer.bos_id], body]).astype(np.int32), np.ones(seq_len, np.float32)
'''

GIN = '''
import my_plugin
include 'experiments/smoke_tiny.gin'

ModelConfig.attention = @TempSoftmaxConfig()
TempSoftmaxConfig.num_heads = 2
TempSoftmaxConfig.temperature = 1.5
DataConfig.source = 'synthetic'
DataConfig.task = @CountingConfig()
CountingConfig.modulus = 40
TrainConfig.steps = 2
TrainConfig.eval_at_end = False
AnalysisConfig.num_sequences = 2
'''


def _attnlab(*args, cwd):
  # -P: like the console script, the working directory is NOT on sys.path; attnlab must put it there itself.
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-P", "-m", "attnlab.cli", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_plugin_variant_score_and_task_train_and_analyse(tmp_path):
  (tmp_path / "my_plugin").mkdir()
  (tmp_path / "my_plugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
  (tmp_path / "plugin.gin").write_text(GIN)
  workdir = str(tmp_path / "run")

  train = _attnlab("train", "--gin_file", "plugin.gin", "--gin_search_path", ROOT, "--workdir", workdir,
                   cwd=tmp_path)
  assert train.returncode == 0, train.stderr[-3000:]
  assert "finished at step 2" in train.stdout
  assert "TempSoftmaxConfig" in (tmp_path / "run" / "config.gin").read_text()
  assert "CountingConfig" in (tmp_path / "run" / "run_config.txt").read_text()

  refused = _attnlab("sinks", "--workdir", workdir, cwd=tmp_path)  # a workdir is data: its imports need consent
  assert refused.returncode == 2 and "--trust_workdir_imports" in refused.stderr, refused.stderr[-3000:]
  sinks = _attnlab("sinks", "--workdir", workdir, "--trust_workdir_imports", cwd=tmp_path)
  assert sinks.returncode == 0, sinks.stderr[-3000:]
  assert json.loads((tmp_path / "run" / "sinks.json").read_text())["step"] == 2


def test_missing_plugin_module_is_a_config_error(tmp_path):
  (tmp_path / "bad.gin").write_text("import no_such_plugin_module\n")
  out = _attnlab("train", "--gin_file", "bad.gin", "--workdir", str(tmp_path / "run"), cwd=tmp_path)
  assert out.returncode == 2
  assert "no_such_plugin_module" in out.stderr and "Traceback" not in out.stderr
