"""Passkey retrieval accuracy vs context length (Landmark format, :class:`attnlab.data.PasskeyConfig`).

An example counts as retrieved when greedy decoding reproduces every digit of the key: with teacher forcing
this is "argmax is right at every answer position", one forward pass per batch.
"""

from __future__ import annotations

import numpy as np

from attnlab.data.packing import rows_to_batch
from attnlab.data.synthetic import PASSKEY_PREFIX, PasskeyConfig, passkey_row
from attnlab.eval.lm_eval import evaluate_batches


def passkey_accuracy(graphdef, params, rest, tokenizer, *, lengths, num_examples: int, digits: int = 5,
                     max_seq_len: int, batch_size: int = 8, seed: int = 1234) -> list[dict]:
  rows = []
  for L in lengths:
    if L > max_seq_len:
      rows.append({"seq_len": L, "skipped": f"beyond ModelConfig.max_seq_len {max_seq_len}"})
      continue
    cfg = PasskeyConfig(digits=digits, preamble=L >= 2 * len(PASSKEY_PREFIX))
    ex = [passkey_row(cfg, np.random.default_rng([seed, L, i]), L, tokenizer) for i in range(num_examples)]
    batches = []
    for s in range(0, num_examples, batch_size):
      tok = np.stack([t for t, _ in ex[s:s + batch_size]])
      batch = rows_to_batch(tok, (tok != tokenizer.pad_id).astype(np.int32),
                            np.stack([m for _, m in ex[s:s + batch_size]]))
      batch["segment_ids"] = None  # one document per row, right-padded: causal attention needs no segment mask
      batches.append(batch)
    out = evaluate_batches(graphdef, params, rest, batches, tokenizer.byte_lengths())
    rows.append({"seq_len": L, "accuracy": out["example_accuracy"], "digit_accuracy": out["accuracy"],
                 "examples": num_examples})
  return rows
