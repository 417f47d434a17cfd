"""Evaluation: bits-per-byte arithmetic, length extrapolation table/plot, passkey rows, eval.json."""

import json
import math
import os

import numpy as np
import pytest

from attnlab.configs import build_experiment, parse_gin
from attnlab.data.tokenizer import ByteTokenizer
from attnlab.eval.extrapolation import format_table, heldout_batches
from attnlab.eval.lm_eval import evaluate_batches
from attnlab.eval.run import run_evaluation
from attnlab.state import build_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup():
  parse_gin([os.path.join(ROOT, "experiments/smoke_tiny.gin")], ["EvalConfig.length_factors = (1, 2, 8)"])
  cfg = build_experiment()
  _, eval_graphdef, state = build_state(cfg)
  return cfg, eval_graphdef, state


def test_bits_per_byte_matches_loss_for_bytes(setup):
  cfg, g, state = setup
  tok = ByteTokenizer()
  batches = heldout_batches(cfg.data, seq_len=32, batch_size=2, num_batches=2, tokenizer=tok)
  out = evaluate_batches(g, state["params"], state["rest"], batches, tok.byte_lengths())
  mask = sum(b["loss_mask"].sum() for b in batches)
  eos = sum(((b["targets"] == tok.eos_id) * b["loss_mask"]).sum() for b in batches)
  assert out["tokens"] == mask
  # bpb = nll / (ln2 · bytes); bytes = predicted tokens minus EOS targets
  assert out["bits_per_byte"] == pytest.approx(out["loss"] * mask / (math.log(2) * (mask - eos)), rel=1e-5)
  assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-6)
  assert 0 <= out["accuracy"] <= 1
  # an untrained model is near uniform over 259 tokens
  assert abs(out["loss"] - math.log(259)) < 0.5


def test_run_evaluation_writes_eval_json_and_plot(setup, tmp_path):
  cfg, g, state = setup
  res = run_evaluation(cfg, g, state["params"], state["rest"], str(tmp_path), step=0)
  on_disk = json.loads((tmp_path / "eval.json").read_text())
  assert on_disk["step"] == 0 and (tmp_path / "length_extrapolation.png").stat().st_size > 0
  rows = on_disk["length_extrapolation"]
  assert [r["seq_len"] for r in rows] == [8, 16, 32, 64, 256]  # 1/4x and 1/2x, then the factors
  assert "skipped" in rows[4] and "max_seq_len" in rows[4]["skipped"]  # 8x > max_seq_len 128
  assert np.isfinite(rows[3]["bits_per_byte"])
  held = on_disk["heldout"]
  assert held["split"] == "validation" and held["num_batches"] == cfg.eval.num_batches and held["seq_len"] == 32
  assert f"validation/loss_nats_per_token@{cfg.eval.num_batches}_batches" in on_disk["metrics"]
  assert on_disk["passkey"][0]["seq_len"] == 128 and 0 <= on_disk["passkey"][0]["accuracy"] <= 1
  assert on_disk["passkey"][0]["inference"] == "forward" and "passkey_table" in on_disk
  assert (tmp_path / on_disk["passkey_plot"]).stat().st_size > 0
  assert "skipped" in format_table(rows) and res["heldout"]["seq_len"] == 32
