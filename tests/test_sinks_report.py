"""attnlab sinks on any kept checkpoint, over all kept checkpoints, on a probe file, with/without BOS; eval --step;
the per-run HTML report (parsed, every linked file present); attnlab stream with several settings."""

import json
import os
from html.parser import HTMLParser

import pytest

from attnlab.analysis.html import linked_files
from attnlab.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BB = os.path.join(ROOT, "experiments/bigram_backcopy.gin")
TEXT = os.path.join(ROOT, "experiments/sinks/text/softmax.gin")
FAST = ["--gin.TrainConfig.progress=False", "--gin.AnalysisConfig.num_sequences=4", "--gin.EvalConfig.num_batches=1"]


class _Checker(HTMLParser):
  def __init__(self):
    super().__init__()
    self.tags = []

  def handle_starttag(self, tag, attrs):
    self.tags.append(tag)


def check_report(path: str) -> list[str]:
  """Parses the HTML and asserts every linked file exists; returns the links."""
  assert os.path.isfile(path), path
  parser = _Checker()
  with open(path) as f:
    parser.feed(f.read())
  assert "table" in parser.tags and "h1" in parser.tags
  links = linked_files(path)
  for href in links:
    assert os.path.exists(os.path.join(os.path.dirname(path), href)), href
  return links


@pytest.fixture(scope="module")
def bb_run(tmp_path_factory):
  """A BB run on a user corpus: one binding, BigramBackcopyConfig.corpus."""
  root = tmp_path_factory.mktemp("bb")
  corpus = root / "corpus.txt"
  corpus.write_text("".join(chr(32 + (i * 7919) % 90) for i in range(30000)))
  d = str(root / "run")
  assert main(["train", "--gin_file", BB, "--workdir", d, "--gin.TrainConfig.steps=4", "--gin.AnalysisConfig.every=2",
               "--gin.TrainConfig.checkpoint_every=2", "--gin.TrainConfig.keep_checkpoints=3",
               f"--gin.BigramBackcopyConfig.corpus='{corpus}'", *FAST]) == 0
  assert str(corpus) in open(os.path.join(d, "config.gin")).read()
  return d


def test_sinks_all_steps_step_and_html(bb_run, capsys, tmp_path):
  assert main(["sinks", "--workdir", bb_run, "--all_steps"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == os.path.join(bb_run, "report.html")
  curve = json.load(open(os.path.join(bb_run, "sinks_over_steps.json")))
  assert [p["step"] for p in curve["curves"]["bos"]] == [2, 4] and "no_bos" not in curve["curves"]
  links = check_report(out[-1])
  assert {"sinks.json", "sink_rate.png", "attention_maps.png", "massive_activations.png", "sinks_over_steps.png",
          "eval.json", "length_extrapolation.png"} <= set(links)
  report = json.load(open(os.path.join(bb_run, "sinks.json")))
  assert "top_to_median" in report["hidden"][1] and "massive" in report["hidden"][1]
  assert report["selected_heads"]["heads"] == [[0, 0]]
  # any kept checkpoint, with and without BOS, on a probe file encoded with the BB chain
  probe = tmp_path / "probe.txt"
  probe.write_text("\n\n".join("the quick brown fox jumps over the lazy dog " * 3 for _ in range(3)))
  assert main(["sinks", "--workdir", bb_run, "--step", "2", "--probe_file", str(probe), "--bos", "both"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  where = os.path.join(bb_run, "sinks_step2_probe")
  assert out[-1] == os.path.join(where, "report.html")
  rep = json.load(open(os.path.join(where, "sinks.json")))
  assert rep["step"] == 2 and rep["probe"] == {"batch": 3, "seq": 64} and rep["probe_source"] == str(probe)
  assert json.load(open(os.path.join(where, "sinks_no_bos", "sinks.json")))["probe_bos"] is False
  check_report(out[-1])
  assert main(["sinks", "--workdir", bb_run, "--step", "3"]) == 2
  assert "kept steps: [2, 4]" in capsys.readouterr().err


def test_eval_step_and_per_task_metrics(bb_run, capsys):
  ev = json.load(open(os.path.join(bb_run, "eval.json")))
  assert {"bigram_ce", "backcopy_ce"} <= set(ev["per_task"])
  assert ev["heldout"]["split"] == "validation" and ev["heldout"]["num_batches"] == 1
  assert "validation/loss_nats_per_token@1_batches" in ev["metrics"] and "metrics.jsonl eval/loss" in ev["metric_notes"]
  assert [r["seq_len"] for r in ev["length_extrapolation"]] == [16, 32, 64]
  assert main(["eval", "--workdir", bb_run, "--step", "2"]) == 0
  assert json.load(open(os.path.join(bb_run, "eval_step2", "eval.json")))["step"] == 2


@pytest.mark.slow
def test_text_run_probe_both_and_stream_settings(tmp_path, capsys):
  d = str(tmp_path / "text")
  assert main(["train", "--gin_file", TEXT, "--workdir", d, "--gin.TrainConfig.steps=2", *FAST]) == 0
  assert main(["sinks", "--workdir", d]) == 0  # text: with and without BOS by default
  out = capsys.readouterr().out.strip().splitlines()
  assert os.path.exists(os.path.join(d, "sinks_no_bos", "sinks.json"))
  check_report(out[-1])
  assert main(["stream", "--workdir", d, "--length", "48", "--streams", "1", "--window", "16", "--sinks", "1", "4",
               "--pos_shift", "both"]) == 0
  out = capsys.readouterr().out
  assert "| sink+window | 4+12 | in cache |" in out and "| sink+window | 1+15 | original |" in out
  for name in ("W16_sink1_posshift", "W16_sink4_posshift", "W16_sink1_origpos", "W16_sink4_origpos"):
    assert os.path.exists(os.path.join(d, "streaming", name, "streaming.png"))
  assert os.path.exists(os.path.join(d, "streaming", "streaming.png"))
