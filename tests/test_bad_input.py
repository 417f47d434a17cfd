"""A table of malformed inputs (configs, CLI calls, data files, workdirs, Python API misuse): every row is a clear
error: one line naming the field and the value, exit code 2 (usage) from the CLI, no traceback, nothing trained.

CLI rows run ``attnlab.cli.main`` in-process (each fails during start-up, before any step); API rows call the
library and expect a ``ValueError`` whose one-line message names the field."""

from __future__ import annotations

import json
import os

import pytest

from attnlab.cli import main
from tests.reliability_helpers import SMOKE

T = ["train", "--gin_file", SMOKE, "--gin.TrainConfig.steps=1", "--gin.TrainConfig.eval_at_end=False"]
W = ["train", "--gin_file", SMOKE, "--workdir", "{tmp}/ws"]  # for rows that bind TrainConfig.steps themselves


def g(binding: str, *named: str):
  """A `train` row with one --gin binding; the error line must contain every ``named`` string."""
  return ("cli", [*T, f"--gin.{binding}"], named or (binding.split("=")[0].split(".")[-1],), 2, None)


def c(argv, *named, rc=2, env=None):
  return ("cli", list(argv), named, rc, env)


def text_source(path_name: str, *named, extra=()):
  """A `train` row reading the file ``path_name`` (created by FILES below) as the dataset."""
  return ("cli", [*T, "--gin.DataConfig.source='files'", f"--gin.DataConfig.paths=('{{tmp}}/{path_name}',)",
                  *extra], named, 2, None)


FILES = {
    "int_text.jsonl": '{"text": 5}\n{"text": 7}\n',
    "null_text.jsonl": '{"text": "hello world"}\n{"text": null}\n',
    "bad_json.jsonl": '{"text": "ok"}\n{"text": \n',
    "no_field.jsonl": '{"body": "hello"}\n',
    "empty.txt": "",
    "table.csv": "a,b\n1,2\n",
    "garbage.parquet": "this is not parquet",
    "bad_tokenizer.json": "{ not json",
    "list_tokenizer.json": "[1, 2, 3]",
    "config_syntax.gin": "ModelConfig.d_model = (\n",
    "config_missing_include.gin": "include 'no/such/file.gin'\n",
    "config_unknown.gin": "Nope.value = 3\n",
}

ROWS = [
    # ---- ModelConfig
    g("ModelConfig.d_model=0", "ModelConfig.d_model", "got 0"),
    g("ModelConfig.d_model=-4", "ModelConfig.d_model", "got -4"),
    g("ModelConfig.d_model='abc'", "ModelConfig.d_model", "'abc'"),
    g("ModelConfig.d_model=1.5", "ModelConfig.d_model", "1.5"),
    g("ModelConfig.d_model=None", "ModelConfig.d_model", "None"),
    g("ModelConfig.d_model=33", "ModelConfig.d_model (33)", "num_heads (2)"),
    g("ModelConfig.d_model=abc", "ModelConfig.d_model = abc"),
    g("ModelConfig.num_layers=0", "ModelConfig.num_layers", "got 0"),
    g("ModelConfig.num_layers=-1", "ModelConfig.num_layers", "got -1"),
    g("ModelConfig.vocab_size=0", "ModelConfig.vocab_size", "got 0"),
    g("ModelConfig.vocab_size='x'", "ModelConfig.vocab_size", "'x'"),
    g("ModelConfig.vocab_size=100", "ModelConfig.vocab_size (100)", "259"),
    g("ModelConfig.max_seq_len=0", "ModelConfig.max_seq_len", "got 0"),
    g("ModelConfig.max_seq_len=16", "DataConfig.seq_len (32)", "ModelConfig.max_seq_len (16)"),
    g("ModelConfig.mlp_dim=0", "ModelConfig.mlp_dim", "got 0"),
    g("ModelConfig.mlp_activation='tanh'", "ModelConfig.mlp_activation", "'tanh'"),
    g("ModelConfig.norm='batchnorm'", "ModelConfig.norm", "'batchnorm'"),
    g("ModelConfig.norm_eps=0.0", "ModelConfig.norm_eps", "0.0"),
    g("ModelConfig.norm_eps=-1e-5", "ModelConfig.norm_eps", "-1e-05"),
    g("ModelConfig.init='xavier'", "ModelConfig.init", "'xavier'"),
    g("ModelConfig.dtype='float13'", "ModelConfig.dtype", "'float13'"),
    g("ModelConfig.dtype='int8'", "ModelConfig.dtype", "'int8'"),
    g("ModelConfig.tie_embeddings='yes'", "ModelConfig.tie_embeddings", "'yes'"),
    g("ModelConfig.position_embedding='rope'", "position_embedding", "'rope'"),
    g("ModelConfig.attention=5", "ModelConfig.attention", "5"),
    # ---- DataConfig
    g("DataConfig.seq_len=1", "DataConfig.seq_len", "got 1"),
    g("DataConfig.seq_len=0", "DataConfig.seq_len", "got 0"),
    g("DataConfig.seq_len='long'", "DataConfig.seq_len", "'long'"),
    g("DataConfig.seq_len=256", "DataConfig.seq_len (256)", "max_seq_len (128)"),
    g("DataConfig.batch_size=0", "DataConfig.batch_size", "got 0"),
    g("DataConfig.batch_size=-2", "DataConfig.batch_size", "got -2"),
    g("DataConfig.source='ftp'", "data source", "'ftp'"),
    g("DataConfig.paths=5", "DataConfig.paths", "5"),
    g("DataConfig.paths=(1, 2)", "DataConfig.paths", "(1, 2)"),
    c([*T, "--gin.DataConfig.source='text'"], "DataConfig.paths is empty"),
    g("DataConfig.source='hub'", "hub_name"),
    g("DataConfig.source='synthetic'", "DataConfig.task"),
    g("DataConfig.tokenizer=''", "DataConfig.tokenizer", "''"),
    g("DataConfig.tokenizer='/nonexistent/tokenizer.json'", "tokenizer file", "/nonexistent/tokenizer.json"),
    g("DataConfig.seed=-1", "DataConfig.seed", "got -1"),
    g("DataConfig.shuffle='no'", "DataConfig.shuffle", "'no'"),
    g("DataConfig.shuffle_buffer=0", "DataConfig.shuffle_buffer", "got 0"),
    g("DataConfig.heldout_every=0", "DataConfig.heldout_every", "got 0"),
    g("DataConfig.text_field=''", "DataConfig.text_field", "''"),
    g("DataConfig.document_mask=2", "DataConfig.document_mask", "2"),
    c([*T, "--gin.DataConfig.batch_size=3", "--gin.TrainConfig.grad_accum=2"], "DataConfig.batch_size (3)",
      "grad_accum (2)"),
    # ---- OptimizerConfig
    g("OptimizerConfig.learning_rate=0.0", "OptimizerConfig.learning_rate", "0.0"),
    g("OptimizerConfig.learning_rate=-1.0", "OptimizerConfig.learning_rate", "-1.0"),
    g("OptimizerConfig.learning_rate='fast'", "OptimizerConfig.learning_rate", "'fast'"),
    g("OptimizerConfig.learning_rate=1e400", "OptimizerConfig.learning_rate", "inf"),
    g("OptimizerConfig.warmup_steps=-1", "OptimizerConfig.warmup_steps", "got -1"),
    g("OptimizerConfig.decay='exp'", "OptimizerConfig.decay", "'exp'"),
    g("OptimizerConfig.decay_steps=0", "OptimizerConfig.decay_steps", "got 0"),
    g("OptimizerConfig.final_lr_fraction=2.0", "OptimizerConfig.final_lr_fraction", "2.0"),
    g("OptimizerConfig.b1=1.0", "OptimizerConfig.b1", "1.0"),
    g("OptimizerConfig.b2=-0.1", "OptimizerConfig.b2", "-0.1"),
    g("OptimizerConfig.eps=0.0", "OptimizerConfig.eps", "0.0"),
    g("OptimizerConfig.weight_decay=-0.1", "OptimizerConfig.weight_decay", "-0.1"),
    g("OptimizerConfig.grad_clip=0.0", "OptimizerConfig.grad_clip", "0.0"),
    g("OptimizerConfig.grad_clip='none'", "OptimizerConfig.grad_clip", "'none'"),
    # ---- TrainConfig
    c([*W, "--gin.TrainConfig.steps=0"], "TrainConfig.steps", "got 0"),
    c([*W, "--gin.TrainConfig.steps='many'"], "TrainConfig.steps", "'many'"),
    c([*W, "--gin.TrainConfig.steps=2.5"], "TrainConfig.steps", "2.5"),
    g("TrainConfig.grad_accum=0", "TrainConfig.grad_accum", "got 0"),
    g("TrainConfig.log_every=0", "TrainConfig.log_every", "got 0"),
    g("TrainConfig.checkpoint_every=0", "TrainConfig.checkpoint_every", "got 0"),
    g("TrainConfig.keep_checkpoints=0", "TrainConfig.keep_checkpoints", "got 0"),
    g("TrainConfig.eval_every=-1", "TrainConfig.eval_every", "got -1"),
    g("TrainConfig.z_loss=-1.0", "TrainConfig.z_loss", "-1.0"),
    g("TrainConfig.peak_flops=-1.0", "TrainConfig.peak_flops", "-1.0"),
    g("TrainConfig.seed=-1", "TrainConfig.seed", "got -1"),
    g("TrainConfig.progress='no'", "TrainConfig.progress", "'no'"),
    # ---- EvalConfig / AnalysisConfig / MeshConfig / DistributedConfig
    g("EvalConfig.num_batches=-1", "EvalConfig.num_batches", "got -1"),
    g("EvalConfig.length_factors=(0,)", "EvalConfig.length_factors", "(0,)"),
    g("EvalConfig.length_factors='x'", "EvalConfig.length_factors", "'x'"),
    g("EvalConfig.passkey_lengths=(-1,)", "EvalConfig.passkey_lengths", "(-1,)"),
    g("EvalConfig.passkey_examples=0", "EvalConfig.passkey_examples", "got 0"),
    g("EvalConfig.passkey_digits=0", "EvalConfig.passkey_digits", "got 0"),
    g("EvalConfig.passkey_inference='magic'", "passkey_inference", "'magic'"),
    g("EvalConfig.batch_size=0", "EvalConfig.batch_size", "got 0"),
    g("EvalConfig.in_training_batches=0", "EvalConfig.in_training_batches", "got 0"),
    g("AnalysisConfig.every=-1", "AnalysisConfig.every", "got -1"),
    g("AnalysisConfig.num_sequences=0", "AnalysisConfig.num_sequences", "got 0"),
    g("AnalysisConfig.seq_len=1", "AnalysisConfig.seq_len", "got 1"),
    g("AnalysisConfig.k=0", "AnalysisConfig.k", "got 0"),
    g("AnalysisConfig.eps=1.5", "AnalysisConfig.eps", "1.5"),
    g("MeshConfig.data=0", "MeshConfig.data", "0"),
    g("MeshConfig.fsdp=-2", "MeshConfig.fsdp", "-2"),
    c([*T, "--gin.MeshConfig.data=-1", "--gin.MeshConfig.fsdp=-1"], "at most one mesh axis", "MeshConfig(data=-1, fsdp=-1"),
    g("MeshConfig.tensor='x'", "MeshConfig.tensor", "'x'"),
    g("DistributedConfig.coordinator_address='nohost'", "DistributedConfig.coordinator_address", "'nohost'"),
    g("DistributedConfig.initialization_timeout=0", "DistributedConfig.initialization_timeout", "got 0"),
    # ---- gin itself
    g("Nope.value=3", "Nope"),
    g("ModelConfig.d_modle=3", "d_modle"),
    g("ModelConfig.d_model=(", "ModelConfig.d_model = ("),
    g("ModelConfig.attention=@Nope()", "Nope"),
    c([*T, "--gin.ModelConfig.d_model="], "--gin.ModelConfig.d_model=", "empty value"),
    c([*T, "--gin.=3"], "--gin.=3", "--gin.KEY=VALUE"),
    c([*T, "--gin.ModelConfig.d_model"], "--gin.ModelConfig.d_model", "--gin.KEY=VALUE"),
    c([*T, "--gin_bindings", ""], "''", "no value"),
    c(["train", "--gin_file", "no/such.gin", "--workdir", "{tmp}/w"], "no/such.gin", "does not exist"),
    c(["train", "--gin_file", "{tmp}", "--workdir", "{tmp}/w"], "is a directory"),
    c(["train", "--gin_file", "{tmp}/config_syntax.gin", "--workdir", "{tmp}/w"], "config_syntax.gin", "syntax"),
    c(["train", "--gin_file", "{tmp}/config_missing_include.gin", "--workdir", "{tmp}/w"], "no/such/file.gin"),
    c(["train", "--gin_file", "{tmp}/config_unknown.gin", "--workdir", "{tmp}/w"], "Nope"),
    # ---- command line
    c([], "the following arguments are required"),
    c(["fly"], "invalid choice: 'fly'"),
    c(["train", "--gin_file", SMOKE], "--workdir"),
    c(["train", "--workdir", "{tmp}/w"], "give at least one --gin_file"),
    c([*T, "--num_processes", "two"], "--num_processes", "'two'"),
    c([*T, "--num_processes", "0"], "--num_processes", "got 0"),
    c([*T, "--process_id", "-1"], "--process_id", "got -1"),
    c([*T, "--coordinator", "localhost"], "--coordinator", "'localhost'"),
    c([*T, "--coordinator", "host:abc"], "--coordinator", "'host:abc'"),
    c([*T, "--coordinator", ":1234"], "--coordinator", "':1234'"),
    c([*T, "--coordinator", "host:99999"], "--coordinator", "'host:99999'"),
    c([*T, "--coordinator_bind_address", "*"], "--coordinator_bind_address", "'*'"),
    c([*T, "--num_processes", "2", "--process_id", "1"], "without a coordinator"),
    c([*T, "--coordinator", "127.0.0.1:9", "--num_processes", "2"], "process_id=None"),
    c([*T, "--coordinator", "127.0.0.1:9", "--num_processes", "2", "--process_id", "2"], "process_id 2",
      "[0, 2)"),
    c([*T, "--initialization_timeout", "0"], "--initialization_timeout", "got 0"),
    c([*T, "--heartbeat_timeout", "-5"], "--heartbeat_timeout", "got -5"),
    c(T, "ATTNLAB_NUM_PROCESSES", "'two'", env={"ATTNLAB_NUM_PROCESSES": "two"}),
    c(T, "ATTNLAB_PROCESS_ID", "'x'", env={"ATTNLAB_PROCESS_ID": "x"}),
    c(T, "coordinator_address", "'nohost'", env={"ATTNLAB_COORDINATOR": "nohost"}),
    c([*T, "--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    c(["eval", "--workdir", "{tmp}", "--force"], "unrecognized arguments: --force"),
    c(["stream", "--workdir", "{tmp}", "--length", "0"], "--length", "got 0"),
    c(["stream", "--workdir", "{tmp}", "--length", "abc"], "--length", "'abc'"),
    c(["stream", "--workdir", "{tmp}", "--streams", "0"], "--streams", "got 0"),
    c(["stream", "--workdir", "{tmp}", "--window", "0"], "--window", "got 0"),
    c(["stream", "--workdir", "{tmp}", "--sinks", "-1"], "--sinks", "got -1"),
    c(["compile", "--gin_file", SMOKE], "--topology"),
    c(["sweep", "--workdir", "{tmp}/sw", "--seeds", "0,x"], "--seeds", "'0,x'"),
    c(["sweep", "--workdir", "{tmp}/sw", "--seeds", "1,1"], "--seeds", "repeated", "'1,1'"),
    c(["sweep", "--workdir", "{tmp}/sw", "--seeds", "-1"], "--seeds", "'-1'"),
    c(["sweep", "--workdir", "{tmp}/sw", "--tasks", "bb", "--arms", "softmax", "--seeds", "0,1",
       "--gin_bindings", "TrainConfig.seed = 3"], "--seeds 0,1", "TrainConfig.seed = 3"),
    # ---- data files
    text_source("int_text.jsonl", "int_text.jsonl", "'text' = 5", "int"),
    text_source("null_text.jsonl", "null_text.jsonl", "'text' = None"),
    text_source("bad_json.jsonl", "bad_json.jsonl", "malformed"),
    text_source("no_field.jsonl", "field 'text' not in", "body"),
    text_source("empty.txt", "empty.txt", "is empty"),
    text_source("table.csv", "table.csv", "cannot infer the file format"),
    text_source("garbage.parquet", "garbage.parquet", "malformed"),
    text_source("missing.txt", "missing.txt", "does not exist"),
    c([*T, "--gin.DataConfig.source='text'", "--gin.DataConfig.paths=('{tmp}',)"], "is a directory"),
    c([*T, "--gin.DataConfig.source='text'", "--gin.DataConfig.paths='{tmp}/missing.txt'"],
      "dataset file '{tmp}/missing.txt' does not exist"),
    c([*T, "--gin.DataConfig.tokenizer='{tmp}/bad_tokenizer.json'"], "bad_tokenizer.json", "not a valid tokenizer"),
    c([*T, "--gin.DataConfig.tokenizer='{tmp}/list_tokenizer.json'"], "list_tokenizer.json", "not a valid tokenizer"),
    c([*T, "--gin.DataConfig.tokenizer='{tmp}'"], "tokenizer file", "does not exist"),
    # ---- workdirs
    c(["eval", "--workdir", "{tmp}/none"], "workdir", "does not exist"),
    c(["sinks", "--workdir", "{tmp}/none"], "workdir", "does not exist"),
    c(["stream", "--workdir", "{tmp}/none"], "workdir", "does not exist"),
    c(["eval", "--workdir", "{tmp}/empty.txt"], "is not a directory"),
    c(["eval", "--workdir", "{tmp}/emptydir"], "holds no config.gin"),
    c(["eval", "--workdir", "{tmp}/nockpt"], "no checkpoint in"),
    c(["eval", "--workdir", "{tmp}/badgin"], "syntax"),
    c(["eval", "--workdir", "{tmp}/importing"], "imports the module 'os'", "--trust_workdir_imports"),
    c(["sinks", "--workdir", "{tmp}/importing"], "imports the module 'os'"),
    c([*T, "--workdir", "{tmp}/empty.txt"], "is not a directory"),
    c([*T, "--workdir", "{tmp}/empty.txt/sub"], "cannot be created", "is not a directory"),
    c([*T, "--workdir", "{tmp}/garbled_record"], "run_config.json", "unreadable"),
    c([*T, "--workdir", "{tmp}/other_run"], "different configuration", "train.seed: 7 -> 0"),
]
WORKDIR_ROWS = {"cli"}  # rows without --workdir get a fresh one


def _api_rows():
  from attnlab.analysis.config import AnalysisConfig
  from attnlab.configs import ConfigError, parse_gin
  from attnlab.data.pipeline import DataConfig
  from attnlab.data.tokenizer import make_tokenizer
  from attnlab.eval.config import EvalConfig
  from attnlab.model.config import ModelConfig
  from attnlab.parallel.distributed import DistributedConfig, parse_address
  from attnlab.parallel.mesh import MeshConfig
  from attnlab.state import Checkpointer
  from attnlab.state.optimizer import OptimizerConfig
  from attnlab.train.config import TrainConfig
  return [
      (lambda t: ModelConfig(d_model=0), ("ModelConfig.d_model", "got 0")),
      (lambda t: ModelConfig(num_layers=True), ("ModelConfig.num_layers", "True")),
      (lambda t: DataConfig(paths=3), ("DataConfig.paths", "3")),
      (lambda t: DataConfig(batch_size="8"), ("DataConfig.batch_size", "'8'")),
      (lambda t: TrainConfig(steps=1.5), ("TrainConfig.steps", "1.5")),
      (lambda t: OptimizerConfig(learning_rate=float("nan")), ("OptimizerConfig.learning_rate", "nan")),
      (lambda t: Checkpointer(str(t / "ck"), keep=0), ("keep_checkpoints", "got 0")),
      (lambda t: DistributedConfig(coordinator_address="x"), ("DistributedConfig.coordinator_address", "'x'")),
      (lambda t: parse_address("a:b:c"), ("host:port", "'a:b:c'")),
      (lambda t: MeshConfig(data=0), ("MeshConfig.data", "0")),
      (lambda t: make_tokenizer(None), ("DataConfig.tokenizer", "None")),
      (lambda t: EvalConfig(length_factors=(0,)), ("EvalConfig.length_factors", "(0,)")),
      (lambda t: AnalysisConfig(eps=2.0), ("AnalysisConfig.eps", "2.0")),
      (lambda t: parse_gin([str(t / "missing.gin")]), ("missing.gin", "does not exist")),
      (lambda t: parse_gin([], ["ModelConfig.d_model = "]), ("ModelConfig.d_model", "no value")),
  ]


API_IDS = list(range(15))


def _fmt(x, tmp):
  return x.replace("{tmp}", str(tmp)) if isinstance(x, str) else x


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  t = tmp_path_factory.mktemp("bad")
  for name, text in FILES.items():
    (t / name).write_text(text)
  (t / "emptydir").mkdir()
  for name, gin_text in (("nockpt", f"include '{SMOKE}'\n"), ("badgin", "ModelConfig.d_model = ((\n"),
                         ("importing", f"import os\ninclude '{SMOKE}'\n")):
    (t / name).mkdir()
    (t / name / "config.gin").write_text(gin_text)
  (t / "garbled_record").mkdir()
  (t / "garbled_record" / "run_config.json").write_text("{ torn")
  (t / "other_run").mkdir()
  (t / "other_run" / "run_config.json").write_text(json.dumps({"train.seed": "7"}))
  return t


def test_the_table_is_big_enough():
  assert len(ROWS) + len(API_IDS) >= 100


@pytest.mark.parametrize("row", range(len(ROWS)), ids=[" ".join(r[1][-2:])[-60:] for r in ROWS])
def test_cli_row_is_one_clear_line(row, tmp, capsys, monkeypatch):
  _, argv, named, rc, env = ROWS[row]
  argv = [_fmt(a, tmp) for a in argv]
  if argv[:len(T)] == T and "--workdir" not in argv:
    argv += ["--workdir", str(tmp / f"w{row}")]
  for k in ("ATTNLAB_COORDINATOR", "ATTNLAB_NUM_PROCESSES", "ATTNLAB_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  for k, v in (env or {}).items():
    monkeypatch.setenv(k, v)
  assert main(argv) == rc
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if "error:" in l]
  assert len(lines) == 1, err
  for n in named:
    assert _fmt(n, tmp) in lines[0], (n, lines[0])
  assert not os.path.exists(tmp / f"w{row}" / "checkpoints")  # nothing trained, nothing half-written


@pytest.mark.parametrize("row", API_IDS)
def test_api_row_is_one_clear_line(row, tmp):
  fn, named = _api_rows()[row]
  with pytest.raises(ValueError) as e:
    fn(tmp)
  message = str(e.value)
  assert "\n" not in message
  for n in named:
    assert n in message, (n, message)
