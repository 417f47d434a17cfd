"""Bigram-Backcopy data: the chain, the backcopy rule, determinism."""

import numpy as np
import pytest

from attnlab.data.bigram_backcopy import BigramBackcopy, build_chain, clean_text, default_chain, trigger_mask


def test_default_chain():
  chain = default_chain()
  assert chain.vocab_size == 67 and chain.bos_id == 65 and chain.delimiter_id == 66
  assert [chain.chars[i] for i in chain.triggers] == [" ", "e", "t"]
  rows = chain.transition[:65].sum(1)
  np.testing.assert_allclose(rows, 1.0)
  assert chain.transition[:, chain.bos_id].sum() == 0 and chain.transition[:, chain.delimiter_id].sum() == 0


def test_sequences_follow_the_rules():
  chain = default_chain()
  data = BigramBackcopy(64, 16, seed=3)
  x = data.batch(0)
  assert x.shape == (16, 65) and x.dtype == np.int32
  assert (x[:, 0] == chain.bos_id).all()
  assert not np.isin(x[:, 1], chain.triggers).any()
  assert (x[:, 1:] < 65).all()
  trig = trigger_mask(chain, x[:, 1:-1])
  np.testing.assert_array_equal(x[:, 2:][trig], x[:, :-2][trig])  # after a trigger: copy the token before it
  nxt, cur = x[:, 2:][~trig], x[:, 1:-1][~trig]
  assert (chain.transition[cur, nxt] > 0).all()  # otherwise: a bigram successor
  assert 0.15 < trig.mean() < 0.45


def test_deterministic_by_seed_and_step():
  a, b = BigramBackcopy(32, 4, seed=1), BigramBackcopy(32, 4, seed=1)
  np.testing.assert_array_equal(a.batch(5), b.batch(5))
  assert not np.array_equal(a.batch(5), a.batch(6))
  assert not np.array_equal(a.batch(5), BigramBackcopy(32, 4, seed=2).batch(5))
  it = iter(a)
  np.testing.assert_array_equal(next(it), a.batch(0))


def test_build_chain_and_errors():
  assert clean_text("Title\n=====\n  a   b\n\n") == "Title\na b"
  chain = build_chain("abcabcabd" * 3, num_chars=4, num_triggers=1)
  assert chain.chars[-1] == "\ufffd" and chain.vocab_size == 6
  assert chain.chars[chain.triggers[0]] in "ab"
  with pytest.raises(ValueError, match="num_triggers"):
    build_chain("abc", num_chars=3, num_triggers=3)
  with pytest.raises(ValueError, match="distinct"):
    build_chain("abc", num_chars=10)
  with pytest.raises(ValueError, match="positive"):
    BigramBackcopy(0, 4)


def test_bigram_backcopy_on_a_user_corpus(tmp_path, monkeypatch):
  """One binding, BigramBackcopyConfig.corpus, swaps the chain's corpus (text file or any datasets file)."""
  import json as _json
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  from attnlab.data import DataConfig, make_dataset
  from attnlab.data.bigram_backcopy import BigramBackcopyConfig, default_chain
  text = "".join(chr(33 + (i * 7919) % 70) + (" " if i % 5 == 0 else "") for i in range(20000))
  f = tmp_path / "corpus.txt"
  f.write_text(text)
  cfg = BigramBackcopyConfig(corpus=str(f))
  chain = cfg.chain
  assert chain.vocab_size == 67 and chain.chars != default_chain().chars
  assert chain.chars[chain.triggers[0]] == " "  # the most frequent character of this corpus
  batch = next(make_dataset(DataConfig(source="synthetic", task=cfg, seq_len=32, batch_size=2)))
  assert batch["inputs"].max() < 67
  j = tmp_path / "corpus.jsonl"
  j.write_text("".join(_json.dumps({"body": text[i:i + 1000]}) + "\n" for i in range(0, len(text), 1000)))
  assert BigramBackcopyConfig(corpus=str(j), corpus_field="body").chain.chars == chain.chars
  with pytest.raises(ValueError, match="num_chars"):
    small = tmp_path / "small.txt"
    small.write_text("abcabc")
    BigramBackcopyConfig(corpus=str(small)).chain
