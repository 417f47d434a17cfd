"""Landmark / meta tokens in the harness: batch interleaving, the pipeline hook, config derivation, training and
the passkey scorers."""

import dataclasses

import numpy as np
import pytest

from attnlab.attention.variants.landmark import LandmarkConfig
from attnlab.attention.variants.meta_tokens import MetaTokenConfig
from attnlab.data.packing import pack_documents, rows_to_batch, segment_positions
from attnlab.data.pipeline import DataConfig, make_dataset
from attnlab.data.special_tokens import LandmarkTokens, MetaTokens, interleave
from attnlab.data.synthetic import PasskeyConfig, passkey_row
from attnlab.data.tokenizer import PAD_ID, ByteTokenizer
from attnlab.eval.config import EvalConfig
from attnlab.eval.passkey import Scorer, forward_scorer, landmark_scorer, make_scorer, passkey_accuracy
from attnlab.model.config import ModelConfig
from attnlab.parallel.mesh import MeshConfig
from attnlab.state import build_state
from attnlab.train.config import TrainConfig
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.loop import train

LM_ID, META_ID = 259, 259


def plain_batch(seq_len, seed=0):
  """Two packed rows of several short documents (so segments, BOS and PAD all occur)."""
  rng = np.random.default_rng(seed)
  docs = [rng.integers(0, 256, int(rng.integers(3, 20))) for _ in range(6)]
  tok, seg = pack_documents(docs, seq_len, bos_id=256, eos_id=257, pad_id=PAD_ID)
  return rows_to_batch(tok[:2], seg[:2])


def check_interleaved(plain, out, special_ids, *, truncated):
  """Dropping the special slots gives back the plain batch (a prefix of it when ``truncated``)."""
  special = np.isin(out["inputs"], special_ids)
  assert np.all(out["loss_mask"][special] == 0)  # special inputs are never loss positions
  assert not np.any(np.isin(out["targets"][out["loss_mask"] > 0], special_ids))  # ... nor targets
  np.testing.assert_array_equal(out["positions"], segment_positions(out["segment_ids"]))
  for r in range(out["inputs"].shape[0]):
    keep = ~special[r]
    for key in ("inputs", "targets", "loss_mask", "segment_ids"):
      got = out[key][r][keep]
      want = plain[key][r]
      if truncated:
        want = want[:len(got)]
      else:  # free slots at the end are PAD
        got, tail = got[:len(want)], got[len(want):]
        assert np.all(tail == (PAD_ID if key in ("inputs", "targets") else 0))
      np.testing.assert_array_equal(got, want, err_msg=key)
    # a special token joins the segment of the plain token before it
    idx = np.flatnonzero(special[r])
    prev = idx[idx > 0]
    np.testing.assert_array_equal(out["segment_ids"][r][prev], out["segment_ids"][r][prev - 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_landmark_interleave(seed):
  spec = LandmarkTokens(block_size=5, landmark_id=LM_ID)
  seq_len = 40
  plain = plain_batch(spec.source_len(seq_len), seed)
  out = interleave(plain, spec, seq_len=seq_len, rng=np.random.default_rng(seed), pad_id=PAD_ID)
  assert out["inputs"].shape == (2, seq_len)
  check_interleaved(plain, out, [LM_ID], truncated=False)
  for row in out["inputs"] == LM_ID:  # exactly one landmark in every block of 5, at a random offset
    lm = np.flatnonzero(row)
    assert np.all(np.diff(lm) == 5) and lm[0] < 5
  # the token before a landmark predicts the token after it
  r, p = np.argwhere(out["inputs"][:, 1:-1] == LM_ID)[0]
  assert out["targets"][r, p] == out["inputs"][r, p + 2] or out["loss_mask"][r, p] == 0


def test_landmark_offsets_vary_between_rows():
  spec = LandmarkTokens(block_size=8, landmark_id=LM_ID)
  b = {k: np.repeat(v, 8, axis=0) for k, v in plain_batch(spec.source_len(64)).items()}
  out = interleave(b, spec, seq_len=64, rng=np.random.default_rng(0), pad_id=PAD_ID)
  assert len({int(np.argmax(row == LM_ID)) for row in out["inputs"]}) > 1


def test_meta_interleave_and_rate_zero():
  spec = MetaTokens(meta_ids=(259, 260), rate=0.3)
  plain = plain_batch(48)
  out = interleave(plain, spec, seq_len=48, rng=np.random.default_rng(0), pad_id=PAD_ID)
  assert 0 < np.isin(out["inputs"], [259, 260]).sum() < 48
  check_interleaved(plain, out, [259, 260], truncated=True)
  same = interleave(plain, MetaTokens(meta_ids=(259,), rate=0.0), seq_len=48, rng=np.random.default_rng(0),
                    pad_id=PAD_ID)
  for k in plain:
    np.testing.assert_array_equal(same[k], plain[k])


def test_pipeline_hook_is_deterministic_and_resumes():
  cfg = DataConfig(seq_len=48, batch_size=2, special_tokens=LandmarkTokens(block_size=6, landmark_id=LM_ID))
  it = make_dataset(cfg)
  first = [next(it) for _ in range(3)]
  assert all(b["inputs"].shape == (2, 48) and (b["inputs"] == LM_ID).sum() == 2 * 8 for b in first)
  it2 = make_dataset(cfg)
  it2.set_state({"step": 2})
  np.testing.assert_array_equal(next(it2)["inputs"], first[2]["inputs"])
  whole = next(make_dataset(dataclasses.replace(cfg, document_mask=False)))
  np.testing.assert_array_equal(whole["inputs"], first[0]["inputs"])
  assert whole["segment_ids"] is None
  with pytest.raises(ValueError, match="special_tokens"):
    DataConfig(special_tokens=(6, LM_ID))


def test_experiment_derives_special_tokens_from_the_model():
  lm = LandmarkConfig(num_heads=2, block_size=6, landmark_id=LM_ID)
  cfg = ExperimentConfig(model=ModelConfig(vocab_size=260, attention=lm, max_seq_len=64),
                         data=DataConfig(seq_len=32))
  assert cfg.data.special_tokens == LandmarkTokens(block_size=6, landmark_id=LM_ID)
  meta = MetaTokenConfig(num_heads=2, meta_ids=(259,), meta_rate=0.1)
  cfg = ExperimentConfig(model=ModelConfig(vocab_size=260, attention=meta, max_seq_len=64),
                         data=DataConfig(seq_len=32))
  assert cfg.data.special_tokens == MetaTokens(meta_ids=(259,), rate=0.1)
  with pytest.raises(ValueError, match="disagrees"):
    ExperimentConfig(model=ModelConfig(vocab_size=260, attention=lm, max_seq_len=64),
                     data=DataConfig(seq_len=32, special_tokens=LandmarkTokens(block_size=7, landmark_id=LM_ID)))
  with pytest.raises(ValueError, match="vocab_size"):
    ExperimentConfig(model=ModelConfig(vocab_size=259, attention=lm, max_seq_len=64), data=DataConfig(seq_len=32))
  with pytest.raises(ValueError, match="different special tokens"):
    ExperimentConfig(model=ModelConfig(vocab_size=260, attention=(lm, meta), num_layers=2, max_seq_len=64),
                     data=DataConfig(seq_len=32))


@pytest.mark.parametrize("attention", [LandmarkConfig(num_heads=2, block_size=6, landmark_id=LM_ID),
                                       MetaTokenConfig(num_heads=2, meta_ids=(META_ID,), meta_rate=0.2)])
def test_harness_trains_with_special_tokens(attention, tmp_path, monkeypatch):
  """The train loop really feeds interleaved batches (spy on the step's inputs) and the loss goes down."""
  cfg = ExperimentConfig(model=ModelConfig(vocab_size=260, d_model=32, num_layers=1, attention=attention,
                                           max_seq_len=64),
                         data=DataConfig(seq_len=32, batch_size=2),
                         train=TrainConfig(steps=4, log_every=1, checkpoint_every=100, eval_at_end=False,
                                           progress=False, peak_flops=1e9, async_checkpoint=False),
                         mesh=MeshConfig(data=1))
  seen = []
  import attnlab.train.loop as loop
  real = loop._device_batch
  monkeypatch.setattr(loop, "_device_batch", lambda b: (seen.append(b), real(b))[1])
  result = train(cfg, str(tmp_path))
  assert result.status == "finished" and all(np.isfinite(h["loss"]) for h in result.history)
  special = np.concatenate([b["inputs"] for b in seen]) == 259
  assert special.any()
  assert np.all(np.concatenate([b["loss_mask"] for b in seen])[special] == 0)


@pytest.fixture(scope="module")
def tiny_landmark():
  lm = LandmarkConfig(num_heads=2, block_size=8, landmark_id=LM_ID, top_k=2, cache_blocks=32)
  cfg = ExperimentConfig(model=ModelConfig(vocab_size=260, d_model=32, num_layers=2, attention=lm, max_seq_len=256),
                         data=DataConfig(source="synthetic", task=PasskeyConfig(preamble=False), seq_len=120,
                                         batch_size=2),
                         eval=EvalConfig(passkey_lengths=(120,), passkey_examples=2))
  _, eval_graphdef, state = build_state(cfg)
  return cfg, eval_graphdef, state


def test_landmark_scorer_equals_forward_when_retrieving_everything(tiny_landmark):
  """Chunked retrieval with top_k >= cached blocks equals the full forward with block-aligned landmarks."""
  cfg, g, state = tiny_landmark
  p, r = state["params"], state["rest"]
  tokens = np.random.default_rng(0).integers(0, 256, (2, 100)).astype(np.int32)
  full = forward_scorer(g, p, r, max_seq_len=256, special_tokens=cfg.data.special_tokens)(tokens)
  chunked = landmark_scorer(g, p, r, chunk_len=24, top_k=16, cache_blocks=16)(tokens)
  np.testing.assert_allclose(chunked, full, atol=2e-4, rtol=2e-4)
  assert full.shape == (2, 100, 260)
  assert forward_scorer(g, p, r, max_seq_len=256, special_tokens=cfg.data.special_tokens).max_len == 224


def test_passkey_accuracy_with_scorers(tiny_landmark):
  cfg, g, state = tiny_landmark
  scorer = make_scorer(cfg, g, state["params"], state["rest"])
  assert scorer.name.startswith("landmark retrieval") and scorer.max_len is None
  rows = passkey_accuracy(scorer, ByteTokenizer(), lengths=(120, 300), num_examples=2, preamble=False)
  assert [r["seq_len"] for r in rows] == [120, 300] and all(0 <= r["accuracy"] <= 1 for r in rows)
  fwd = make_scorer(dataclasses.replace(cfg, eval=EvalConfig(passkey_inference="forward")), g, state["params"],
                    state["rest"])
  skipped = passkey_accuracy(fwd, ByteTokenizer(), lengths=(300,), num_examples=2, preamble=False)
  assert "skipped" in skipped[0]


def test_passkey_accuracy_counts_right_answers():
  """A scorer that knows the rows is always right; a constant one never."""
  tok = ByteTokenizer()
  rows = np.stack([passkey_row(PasskeyConfig(preamble=False), np.random.default_rng([1234, 200, i]), 200, tok)[0]
                   for i in range(3)])  # the rows passkey_accuracy generates (same seeds)
  cheat = Scorer(lambda x: np.eye(tok.vocab_size)[rows[:, 1:x.shape[1] + 1]], None, "cheat")
  assert passkey_accuracy(cheat, tok, lengths=(200,), num_examples=3, batch_size=3,
                          preamble=False)[0]["accuracy"] == 1.0
  const = Scorer(lambda x: np.zeros(x.shape + (tok.vocab_size,)), None, "const")
  out = passkey_accuracy(const, tok, lengths=(200,), num_examples=3, preamble=False)[0]
  assert out["accuracy"] == 0.0 and out["digit_accuracy"] == 0.0
