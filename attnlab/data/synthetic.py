"""Synthetic tasks generated in code, deterministic by seed, and their registry (the extension point).

A task is a frozen config dataclass plus a generator ``fn(cfg, rng, seq_len, tokenizer) -> (tokens, loss_mask)``
returning one row, ``tokens`` (seq_len + 1,) starting with BOS and ``loss_mask`` (seq_len,) over the targets
``tokens[1:]``. Register a new task with ``@register_task(MyTaskConfig)`` and select it with
``DataConfig.task = MyTaskConfig(...)``; the pipeline handles batching, sharding, determinism and checkpointing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Generator = Callable[..., tuple[np.ndarray, np.ndarray]]
_TASKS: dict[type, Generator] = {}


def register_task(config_cls: type):
  """Decorator registering the row generator of a synthetic task config class."""

  def wrap(fn: Generator) -> Generator:
    if config_cls in _TASKS:
      raise ValueError(f"synthetic task {config_cls.__name__} is already registered")
    _TASKS[config_cls] = fn
    return fn

  return wrap


def task_generator(cfg) -> Generator:
  try:
    return _TASKS[type(cfg)]
  except KeyError:
    known = sorted(c.__name__ for c in _TASKS)
    raise ValueError(f"no synthetic task registered for {type(cfg).__name__}; known: {known}") from None


def task_config_classes() -> list[type]:
  return list(_TASKS)


# ---------------------------------------------------------------------------------------------- passkey retrieval
PASSKEY_PREFIX = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                  "I will quiz you about the important information there. ")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "


@dataclasses.dataclass(frozen=True)
class PasskeyConfig:
  """Passkey retrieval in the format of the Landmark Attention paper (Mohtashami & Jaggi 2023): a random
  ``digits``-digit key hidden at a random place in repeated filler text (as many repeats as fit), asked for at
  the end. The loss covers the
  answer digits only (``answer_only``) or every token."""

  digits: int = 5
  answer_only: bool = True
  preamble: bool = True  # the paper's instruction sentence (~150 bytes); off for short byte-level contexts


def passkey_row(cfg: PasskeyConfig, rng: np.random.Generator, seq_len: int, tokenizer):
  """One passkey example; the answer digits are the last non-PAD targets."""
  key = "".join(str(d) for d in rng.integers(0, 10, cfg.digits))
  enc = tokenizer.encode
  prefix = enc(PASSKEY_PREFIX) if cfg.preamble else np.zeros(0, np.int32)
  filler, needle = enc(PASSKEY_FILLER), enc(PASSKEY_NEEDLE.format(key=key))
  question, answer = enc(PASSKEY_QUESTION), enc(key)
  fixed = 1 + len(prefix) + len(needle) + len(question) + len(answer)
  n_fill = (seq_len + 1 - fixed) // len(filler)
  if n_fill < 0:
    raise ValueError(f"seq_len {seq_len} is too short for a passkey example (needs at least {fixed - 1})")
  where = int(rng.integers(0, n_fill + 1))
  parts = [[tokenizer.bos_id], prefix, *[filler] * where, needle, *[filler] * (n_fill - where), question, answer]
  body = np.concatenate([np.asarray(p, np.int32) for p in parts])
  tokens = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
  tokens[:len(body)] = body
  mask = np.zeros(seq_len, np.float32)
  if cfg.answer_only:
    mask[len(body) - 1 - len(answer):len(body) - 1] = 1.0
  else:
    mask[:len(body) - 1] = 1.0
  return tokens, mask


register_task(PasskeyConfig)(passkey_row)


# ----------------------------------------------------------------------------------- multi-query associative recall
@dataclasses.dataclass(frozen=True)
class MQARConfig:
  """Multi-query associative recall (Arora et al. 2023, Zoology): ``BOS k1 v1 ... kD vD`` followed by
  ``num_queries`` pairs ``k v`` re-asking keys of the context; the loss covers the queried values only. Keys are
  drawn without replacement from ``[key_lo, key_hi)``, values from ``[value_lo, value_hi)``."""

  num_pairs: int = 8
  num_queries: int = 8
  key_lo: int = 0
  key_hi: int = 128
  value_lo: int = 128
  value_hi: int = 256

  def __post_init__(self):
    if self.num_pairs > self.key_hi - self.key_lo:
      raise ValueError(f"num_pairs ({self.num_pairs}) exceeds the number of distinct keys "
                       f"({self.key_hi - self.key_lo})")
    if self.num_queries > self.num_pairs:
      raise ValueError(f"num_queries ({self.num_queries}) exceeds num_pairs ({self.num_pairs})")


def mqar_row(cfg: MQARConfig, rng: np.random.Generator, seq_len: int, tokenizer):
  need = 2 * (cfg.num_pairs + cfg.num_queries)
  if need > seq_len:
    raise ValueError(f"seq_len {seq_len} is too short for MQAR with {cfg.num_pairs} pairs and "
                     f"{cfg.num_queries} queries (needs {need})")
  keys = rng.choice(np.arange(cfg.key_lo, cfg.key_hi), cfg.num_pairs, replace=False)
  values = rng.integers(cfg.value_lo, cfg.value_hi, cfg.num_pairs)
  q = rng.choice(cfg.num_pairs, cfg.num_queries, replace=False)
  body = np.concatenate([[tokenizer.bos_id], np.stack([keys, values], 1).ravel(),
                         np.stack([keys[q], values[q]], 1).ravel()]).astype(np.int32)
  tokens = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
  tokens[:len(body)] = body
  mask = np.zeros(seq_len, np.float32)
  first_query_key = 1 + 2 * cfg.num_pairs
  mask[first_query_key:len(body) - 1:2] = 1.0  # target of a query key is its value
  return tokens, mask


register_task(MQARConfig)(mqar_row)
