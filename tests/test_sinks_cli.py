"""The sink study end to end: Bigram-Backcopy through the harness, sinks/* logged in training, ``attnlab sinks``
on a trained run, the sweep on 2 tiny arms (table, reuse), ``attnlab stream``, the probe batches and the table's
disagreement notes."""

import glob
import json
import os

import numpy as np
import pytest

from attnlab.analysis.config import AnalysisConfig
from attnlab.analysis.probe import probe_batch
from attnlab.analysis.sweep import discover, format_table, notes
from attnlab.cli import main
from attnlab.configs import build_experiment, parse_gin
from attnlab.data.bigram_backcopy import BigramBackcopyConfig, default_chain
from attnlab.data.pipeline import DataConfig, make_dataset
from tests.test_sinks_report import check_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BB = os.path.join(ROOT, "experiments/bigram_backcopy.gin")
SWEEP = os.path.join(ROOT, "experiments/sinks")
FAST = ["--gin.TrainConfig.progress=False", "--gin.AnalysisConfig.num_sequences=8", "--gin.EvalConfig.num_batches=1"]


def test_bigram_backcopy_task_batches():
  cfg = DataConfig(source="synthetic", task=BigramBackcopyConfig(), seq_len=16, batch_size=4, seed=3)
  chain = default_chain()
  a, b = next(make_dataset(cfg)), next(make_dataset(cfg))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])  # a pure function of the seed
  tokens = np.concatenate([a["inputs"], a["targets"][:, -1:]], 1)
  assert (tokens[:, 0] == chain.bos_id).all() and (tokens[:, 1:] != chain.bos_id).all()
  assert tokens.max() < chain.vocab_size and not np.isin(tokens[:, 1], chain.triggers).any()
  for row in tokens:
    for t in range(1, len(row) - 1):
      if row[t] in chain.triggers:
        assert row[t + 1] == row[t - 1]  # backcopy
  assert (a["loss_mask"] == 1).all() and (a["segment_ids"] == 1).all()
  held_out = next(make_dataset(cfg, split="validation"))
  assert not np.array_equal(held_out["inputs"], a["inputs"])


def test_probe_batches():
  acfg = AnalysisConfig(num_sequences=6, seq_len=32)
  bb = probe_batch(DataConfig(source="synthetic", task=BigramBackcopyConfig(), seq_len=64), acfg)
  assert bb.tokens.shape == (6, 32) and (bb.tokens[:, 0] == default_chain().bos_id).all()
  np.testing.assert_array_equal(bb.query_mask, ~np.isin(bb.tokens, default_chain().triggers))
  text = DataConfig(seq_len=64)
  with_bos, without = probe_batch(text, acfg), probe_batch(text, acfg, bos=False)
  assert with_bos.tokens.shape == without.tokens.shape == (6, 32) and with_bos.query_mask is None
  assert (with_bos.tokens[:, 0] == 256).all() and (without.tokens < 256).all()
  np.testing.assert_array_equal(with_bos.tokens[:, 1:], without.tokens[:, :-1])  # the same text, BOS dropped


def test_every_sweep_arm_builds():
  arms = discover(SWEEP, short=True)
  assert {a.task for a in arms} == {"bb", "text"} and len(arms) == 22
  assert [a.name for a in arms if a.task == "bb"][:3] == ["softmax", "sigmoid_b0", "sigmoid_logn"]
  for arm in arms:
    parse_gin(list(arm.gin_files))
    cfg = build_experiment()
    assert cfg.analysis.every > 0 and cfg.data.seq_len == 64
  relu = [a for a in arms if a.task == "bb" and a.name == "relu"][0]
  assert relu.gin_files[-1].endswith("_short_relu.gin")
  parse_gin(list(relu.gin_files))
  assert build_experiment().optimizer.learning_rate == 3e-3  # Guo et al.'s ReLU learning rate, also under --short
  parse_gin([os.path.join(SWEEP, "bb", "relu.gin")])
  assert build_experiment().optimizer.learning_rate == 3e-3
  for arm in ("softmax", "sigmoid_b0", "sigmoid_norm"):  # the accelerator recipe builds (not trained here)
    parse_gin([os.path.join(ROOT, "experiments", "gu60m", arm + ".gin")])
    cfg = build_experiment()
    assert (cfg.model.d_model, cfg.model.num_layers, cfg.data.seq_len, cfg.data.bos) == (768, 10, 2048, "none")
  with pytest.raises(ValueError, match="unknown arm"):
    discover(SWEEP, arms=["nope"])


def test_notes_name_disagreements():
  switched_off = {"arm": "relu", "sink_rate_proxy": 96.0, "sink_rate_raw": 0.0, "first_token_attn_raw": 0.03,
                  "row_mass": 0.2, "sink_mass": 0.0}
  assert any("PROXY SAYS SINK" in n and "switched off" in n for n in notes(switched_off))
  b0 = {"arm": "sigmoid_b0", "sink_rate_proxy": 96.0, "sink_rate_raw": 94.0, "first_token_attn_raw": 0.55,
        "row_mass": 1.14, "sink_mass": 0.0}
  flagged = notes(b0)
  assert any("DISAGREES WITH THE PAPER" in n for n in flagged) and any("unnormalised" in n for n in flagged)
  unused = {"arm": "key_bias", "sink_rate_proxy": 97.0, "sink_rate_raw": 97.0, "first_token_attn_raw": 0.8,
            "row_mass": 1.0, "sink_mass": 0.0, "learned_sink": True}
  assert any("LEARNED SINK UNUSED" in n for n in notes(unused))
  broad = {"arm": "sigmoid_b0", "sink_rate_proxy": 0.0, "sink_rate_raw": 36.0, "first_token_attn_raw": 0.26,
           "row_mass": 8.8, "sink_mass": 0.0}
  assert any("RAW SAYS SINK" in n for n in notes(broad))
  assert notes({"arm": "softplus", "sink_rate_proxy": 0.0, "sink_rate_raw": 0.0}) == []
  md = format_table([{**switched_off, "task": "bb", "label": "ReLU/n", "steps": 3, "loss": 1.0,
                      "notes": notes(switched_off)}])
  assert "| ReLU/n | 1.000 |" in md and "PROXY SAYS SINK" in md and "no sink on BB" in md


@pytest.fixture(scope="module")
def bb_run(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("bb") / "run")
  assert main(["train", "--gin_file", BB, "--workdir", d, "--gin.TrainConfig.steps=4",
               "--gin.AnalysisConfig.every=2", *FAST]) == 0
  return d


def test_training_logs_sink_metrics(bb_run):
  rows = [json.loads(line) for line in open(os.path.join(bb_run, "metrics.jsonl"))]
  logged = [r for r in rows if "sinks/sink_rate_raw" in r]
  assert [r["step"] for r in logged] == [0, 2, 4]
  assert {"sinks/sink_rate_proxy", "sinks/first_token_attn_raw", "sinks/value_norm_ratio",
          "sinks/massive_ratio"} <= set(logged[0])
  assert glob.glob(os.path.join(bb_run, "tensorboard", "events.out.tfevents.*"))


def test_sinks_command_writes_report(bb_run, capsys):
  assert main(["sinks", "--workdir", bb_run]) == 0
  assert "sink_rate_raw" in capsys.readouterr().out
  report = json.load(open(os.path.join(bb_run, "sinks.json")))
  assert report["step"] == 4 and report["probe"] == {"batch": 8, "seq": 64}
  assert {"ce", "ce_masked", "ce_unmasked"} <= set(report["probe_loss"])
  assert {"sink_rate.png", "norm_ratio.png", "attention_maps.png", "history.png"} <= set(report["files"])
  for f in report["files"]:
    assert os.path.exists(os.path.join(bb_run, f))
  assert main(["sinks", "--workdir", os.path.join(bb_run, "missing")]) == 2


def test_sweep_two_tiny_arms(tmp_path, capsys):
  args = ["sweep", "--workdir", str(tmp_path), "--arms", "softmax", "--short", "--gin_bindings",
          "TrainConfig.steps = 3", "--gin_bindings", "AnalysisConfig.num_sequences = 8", "--gin_bindings",
          "EvalConfig.num_batches = 1"]
  assert main(args) == 0
  out = capsys.readouterr().out
  assert "[1/2] bb/softmax: trained" in out and "[2/2] text/softmax: trained" in out
  last = out.strip().splitlines()[-1]
  assert last == os.path.join(str(tmp_path), "report.html")  # the sweep's HTML report is the last line
  links = check_report(last)
  assert {"sink_table.png", "sink_table.json", "bb/softmax/report.html", "text/softmax/report.html"} <= set(links)
  check_report(os.path.join(str(tmp_path), "text/softmax/report.html"))
  table = json.load(open(tmp_path / "sink_table.json"))
  assert [(r["task"], r["arm"], r["steps"]) for r in table["rows"]] == [("bb", "softmax", 3), ("text", "softmax", 3)]
  assert "no_bos_sink_rate_proxy" in table["rows"][1] and "probe_ce_unmasked" in table["rows"][0]
  md = (tmp_path / "sink_table.md").read_text()
  assert md.count("| softmax |") == 2 and "Gu et al. 2025 Table 6" in md
  assert (tmp_path / "sink_table.png").exists() and (tmp_path / "text/softmax/sinks_no_bos/sinks.json").exists()
  assert main(args) == 0  # finished arms are reused, not retrained
  assert "bb/softmax: reused" in capsys.readouterr().out
  text_run = str(tmp_path / "text/softmax")
  assert main(["stream", "--workdir", text_run, "--length", "80", "--streams", "1", "--window", "16"]) == 0
  assert "| sink+window | 4+12 |" in capsys.readouterr().out
  assert (tmp_path / "text/softmax/streaming/streaming.png").exists()
  assert main(["stream", "--workdir", str(tmp_path / "bb/softmax")]) == 2  # learned positions: refused, named
  assert "learned absolute position" in capsys.readouterr().err
