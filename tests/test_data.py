"""Input pipeline: tokenizer, packing, determinism, sharding, checkpointable position, datasets offline."""

import json

import numpy as np
import pytest

from attnlab.data import (BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, DataConfig, MQARConfig, PasskeyConfig, make_dataset,
                          pack_documents)
from attnlab.data.corpus import embedded_documents


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_byte_tokenizer_roundtrip_and_ids():
  tok = ByteTokenizer()
  ids = tok.encode("héllo")
  assert ids.tolist() == list("héllo".encode())
  assert tok.decode(np.concatenate([[BOS_ID], ids, [EOS_ID, PAD_ID]])) == "héllo"
  assert (tok.vocab_size, BOS_ID, EOS_ID, PAD_ID) == (259, 256, 257, 258)
  assert tok.byte_lengths()[:256].sum() == 256 and tok.byte_lengths()[256:].sum() == 0


def test_packing_bos_segments_and_masks():
  docs = [np.arange(5), np.arange(10, 22), np.arange(30, 33)]
  tokens, seg = pack_documents(docs, 8, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
  assert tokens.shape == seg.shape and tokens.shape[1] == 9
  starts = np.flatnonzero(tokens.ravel() == BOS_ID)
  # 3 documents, the 13-token second one (with EOS) split into 2 chunks -> 4 BOS-started chunks
  assert len(starts) == 4 and tokens[0, 0] == BOS_ID
  from attnlab.data import rows_to_batch
  b = rows_to_batch(tokens, seg)
  # no loss across a segment boundary or on padding; positions restart at each BOS
  assert np.all(b["loss_mask"][b["targets"] == PAD_ID] == 0)
  assert np.all(b["loss_mask"][b["targets"] == BOS_ID] == 0)
  assert np.all(b["positions"][b["inputs"] == BOS_ID] == 0)
  assert b["loss_mask"].sum() == sum(len(d) + 1 for d in docs)  # every content token + EOS predicted once


def test_embedded_corpus_split_is_disjoint():
  train, val = embedded_documents("train"), embedded_documents("validation")
  assert len(val) >= 3 and len(train) > 10 * len(val)
  assert not set(train) & set(val)


def test_same_seed_same_batches_and_resume_position():
  cfg = DataConfig(seq_len=32, batch_size=2, seed=3)
  a, b = _take(make_dataset(cfg), 4), _take(make_dataset(cfg), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  other = _take(make_dataset(DataConfig(seq_len=32, batch_size=2, seed=4)), 1)[0]
  assert not np.array_equal(other["inputs"], a[0]["inputs"])
  it = make_dataset(cfg)
  it.set_state(json.loads(json.dumps({"step": 2})))
  np.testing.assert_array_equal(next(it)["inputs"], a[2]["inputs"])


def _row_ids(it, steps):
  return [int(i) for s in range(steps) for i in it.row_indices(s)]


def test_process_shards_are_disjoint_and_cover():
  cfg = DataConfig(seq_len=32, batch_size=4)
  its = [make_dataset(cfg, process_index=p, process_count=3) for p in range(3)]
  rows = [_row_ids(it, 5) for it in its]
  flat = sum(rows, [])
  assert len(flat) == len(set(flat)) == 60  # within one epoch no row is read twice
  b0, b1 = next(its[0]), next(its[1])
  assert not np.array_equal(b0["inputs"], b1["inputs"])
  with pytest.raises(ValueError, match="process_index"):
    make_dataset(cfg, process_index=3, process_count=3)


def test_synthetic_tasks_deterministic_and_sharded():
  cfg = DataConfig(source="synthetic", task=MQARConfig(num_pairs=4, num_queries=3), seq_len=32, batch_size=2)
  a, b = next(make_dataset(cfg)), next(make_dataset(cfg))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert (a["loss_mask"].sum(1) == 3).all()
  keys, vals = a["inputs"][0, 1:9:2], a["inputs"][0, 2:9:2]
  qk = a["inputs"][0][a["loss_mask"][0] > 0]
  for k, v in zip(qk, a["targets"][0][a["loss_mask"][0] > 0]):  # every query's target is its context value
    assert vals[list(keys).index(k)] == v
  p1 = next(make_dataset(cfg, process_index=1, process_count=2))
  assert not np.array_equal(p1["inputs"], next(make_dataset(cfg, process_index=0, process_count=2))["inputs"])
  pk = next(make_dataset(DataConfig(source="synthetic", task=PasskeyConfig(preamble=False), seq_len=160,
                                    batch_size=1)))
  text = ByteTokenizer().decode(pk["inputs"][0])
  answer = ByteTokenizer().decode(pk["targets"][0][pk["loss_mask"][0] > 0])
  assert len(answer) == 5 and f"The pass key is {answer}." in text


@pytest.fixture(scope="module")
def local_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  docs = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(64)]
  (d / "a.txt").write_text("\n".join(docs[:32]) + "\n")
  (d / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[32:]))
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": docs}), d / "c.parquet")
  (d / "empty.txt").write_text("")
  return d, docs


def test_datasets_offline_local_files(local_files, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  d, docs = local_files
  from attnlab.data import sources
  assert sources.local_documents("files", (str(d / "a.txt"),), text_documents="line") == docs[:32]
  assert sources.local_documents("files", (str(d / "a.txt"),)) == ["\n".join(docs[:32]).strip()]  # one paragraph
  assert sources.local_documents("files", (str(d / "b.jsonl"),)) == docs[32:]
  assert sources.local_documents("parquet", (str(d / "c.parquet"),), "content") == docs
  it = make_dataset(DataConfig(source="files", paths=(str(d / "a.txt"),), seq_len=32, batch_size=2))
  assert next(it)["inputs"][0, 0] == BOS_ID
  val = make_dataset(DataConfig(source="parquet", paths=(str(d / "c.parquet"),), text_field="content",
                                seq_len=32, batch_size=2), split="validation")
  assert val.num_rows > 0


def test_streaming_path_resumes(local_files, monkeypatch):
  """The hub code path (streaming ``datasets`` + shuffle buffer + node split), on local files."""
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  d, _ = local_files
  cfg = DataConfig(source="files", paths=(str(d / "a.txt"), str(d / "b.jsonl")), streaming=True, seq_len=32,
                   batch_size=2, shuffle_buffer=16)
  with pytest.raises(ValueError, match="format"):
    make_dataset(cfg).__next__()
  cfg = DataConfig(source="json", paths=(str(d / "b.jsonl"),), streaming=True, seq_len=32, batch_size=2,
                   shuffle_buffer=16)
  a = _take(make_dataset(cfg), 3)
  it = make_dataset(cfg)
  it.set_state({"step": 2})
  np.testing.assert_array_equal(next(it)["inputs"], a[2]["inputs"])


def test_missing_or_empty_files_are_named(local_files):
  d, _ = local_files
  for path, msg in ((d / "nope.txt", "does not exist"), (d / "empty.txt", "is empty")):
    with pytest.raises(ValueError, match=msg):
      make_dataset(DataConfig(source="text", paths=(str(path),), seq_len=32, batch_size=2))


def test_plain_text_documents_by_paragraph_or_size(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  from attnlab.data import sources
  paras = [f"paragraph {i}\nsecond line of {i}" for i in range(40)]
  f = tmp_path / "book.txt"
  f.write_text("\n\n".join(paras) + "\n")
  assert sources.local_documents("files", (str(f),)) == paras
  by_size = sources.local_documents("files", (str(f),), text_documents="size", doc_chars=100)
  assert 5 < len(by_size) < 40 and all(len(d) <= 100 for d in by_size)
  assert "".join(by_size).replace("\n", "") == "".join(paras).replace("\n", "")
  # a held-out split exists (the probe used to fail with "no complete held-out row" on one-line documents)
  cfg = DataConfig(source="files", paths=(str(f),), seq_len=16, batch_size=2, heldout_every=4)
  assert make_dataset(cfg, split="validation").num_rows > 0
  with pytest.raises(ValueError, match="text_documents"):
    DataConfig(source="files", paths=(str(f),), text_documents="sentence")


def test_bos_modes_and_random_offsets():
  from attnlab.data.packing import pack_documents
  docs = [np.arange(10, 30, dtype=np.int32), np.arange(40, 45, dtype=np.int32)]
  ids = dict(bos_id=BOS_ID, eos_id=EOS_ID, pad_id=0)
  chunk, _ = pack_documents(docs, 8, **ids)
  assert (chunk[:, 0] == BOS_ID).all()
  doc, _ = pack_documents(docs, 8, bos="document", **ids)
  assert doc[0, 0] == BOS_ID and doc[1, 0] != BOS_ID and (doc == BOS_ID).sum() == 2
  none, _ = pack_documents(docs, 8, bos="none", **ids)
  assert not (none == BOS_ID).any() and none[0, 0] == 10
  it = make_dataset(DataConfig(seq_len=32, batch_size=4, row_offsets="random", bos="document"))
  b1, b2 = next(it), next(it)
  assert b1["inputs"].shape == (4, 32) and not np.array_equal(b1["inputs"], b2["inputs"])
  assert (b1["inputs"][:, 0] != BOS_ID).any()  # rows rarely start at a document start
  it.set_state({"step": 1})
  np.testing.assert_array_equal(next(it)["inputs"], b2["inputs"])
  assert make_dataset(DataConfig(seq_len=32, batch_size=4, row_offsets="random"), split="validation").num_rows > 0
  with pytest.raises(ValueError, match="bos"):
    DataConfig(bos="sometimes")
