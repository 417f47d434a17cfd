"""write_sink_report: sinks.json holds every metric and the plots are written."""

import json
import os

import jax
import numpy as np
from flax import nnx

import attnlab
from attnlab.analysis import history_record, model_metrics, write_sink_report


def test_report_files_and_json(tmp_path):
  cfg = attnlab.ModelConfig(vocab_size=17, d_model=32, num_layers=2, max_seq_len=16,
                            attention=(attnlab.AttentionConfig(num_heads=2, key_bias=True),
                                       attnlab.AttentionConfig(num_heads=2, score="relu")))
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(0), (3, 16), 0, 17)
  _, aux = model(tokens, return_internals=True)
  rec = history_record(model_metrics(aux))
  assert "sinks/sink_rate_proxy" in rec and "sinks/sink_rate_raw" in rec
  history = tmp_path / "metrics.jsonl"
  history.write_text("\n".join(json.dumps({"step": s, "loss": 1.0, **rec}) for s in (0, 10, 20)) + "\n")
  out = tmp_path / "report"
  write_sink_report(model, tokens, str(out), history=str(history))
  for name in ("sinks.json", "sink_rate.png", "attention_maps.png", "norm_ratio.png", "history.png"):
    assert os.path.getsize(out / name) > 0, name
  data = json.loads((out / "sinks.json").read_text())
  assert data["k"] == 1 and data["eps"] == 0.3 and data["probe"] == {"batch": 3, "seq": 16}
  assert [a["score"] for a in data["attention"]] == ["softmax", "relu"]
  assert len(data["layers"]) == 2 and len(data["hidden"]) == 3
  assert len(data["layers"][0]["sink_rate_raw"]) == 2
  assert data["layers"][0]["sink_mass"][0] > 0 and data["layers"][1]["sink_mass"] == [0.0, 0.0]
  np.testing.assert_allclose(data["summary"]["sink_rate_proxy"], rec["sinks/sink_rate_proxy"], rtol=1e-6)
  # Without a history, no history plot.
  write_sink_report(model, tokens, str(tmp_path / "r2"))
  assert not os.path.exists(tmp_path / "r2" / "history.png")
