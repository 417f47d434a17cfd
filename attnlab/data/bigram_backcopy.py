"""Bigram-Backcopy (BB): the toy task on which a softmax transformer grows an attention sink.

Guo et al. 2024, "Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs"
(arXiv 2410.13835), ``BBM/data.py``. A sequence is

    x_0 = <s>;  x_1 ~ marginal without triggers;
    x_{t+1} = x_{t-1}           if x_t is a trigger  (backcopy)
    x_{t+1} ~ P(. | x_t)        otherwise            (bigram)

where the triggers are the ``num_triggers`` most frequent characters. Guo et al. use the character bigram of
Tiny-Shakespeare (65 characters + ``<s>`` + an unused delimiter ``<d>``, V = 67). attnlab cannot ship that corpus,
so :func:`default_chain` builds the chain from the English text embedded in Python (``pydoc_data.topics``): the
64 most frequent characters plus one "other character" token, ``<s>`` and ``<d>`` (V = 67); its triggers are
' ', 'e' and 't', the same three as Tiny-Shakespeare's.

Your own corpus with one binding: ``BigramBackcopyConfig.corpus = "input.txt"`` (any text file, e.g. Karpathy's
Tiny-Shakespeare ``input.txt``, Guo et al.'s corpus; or a ``.jsonl`` / ``.parquet`` file read with ``datasets``),
or ``BigramBackcopyConfig.corpus_hub = "name"`` for a ``datasets`` hub source (``corpus_field`` names the text
column). The chain is built from the first ``corpus_max_chars`` characters (:func:`corpus_chain`).

Through the training harness: ``DataConfig.source = 'synthetic'``, ``DataConfig.task = @BigramBackcopyConfig()``
and ``ModelConfig.vocab_size = 67`` (``experiments/bigram_backcopy.gin``). The task has its own vocabulary and
``<s>``; the run's tokenizer is not used.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import re

import numpy as np

from attnlab.data import sources
from attnlab.data.synthetic import register_task

OTHER = "\ufffd"  # the one token every character outside the vocabulary maps to


@dataclasses.dataclass(frozen=True, eq=False)
class BigramChain:
  """A character bigram chain with triggers. Ids ``0..len(chars)-1`` are characters, then ``<s>``, then ``<d>``."""

  chars: tuple[str, ...]
  transition: np.ndarray  # (V, V) float64, rows of characters sum to 1; <s> is never a successor
  marginal: np.ndarray  # (V,) unigram distribution over characters
  triggers: tuple[int, ...]

  @property
  def bos_id(self) -> int:
    return len(self.chars)

  @property
  def delimiter_id(self) -> int:
    return len(self.chars) + 1

  @property
  def vocab_size(self) -> int:
    return len(self.chars) + 2

  def decode(self, ids) -> str:
    names = self.chars + ("<s>", "<d>")
    return "".join(names[i] for i in np.asarray(ids).ravel())


def clean_text(text: str) -> str:
  """Drops reStructuredText underlines (lines of one repeated punctuation character) and collapses spaces."""
  lines = []
  for line in text.splitlines():
    line = re.sub(r"[ \t]+", " ", line.strip())
    if line and not re.fullmatch(r"([^\w\s])\1*", line):
      lines.append(line)
  return "\n".join(lines)


def build_chain(text: str, *, num_chars: int = 65, num_triggers: int = 3) -> BigramChain:
  """Bigram chain over ``num_chars`` character tokens: the most frequent ``num_chars - 1`` characters of ``text``
  and one token for every other character.

  Transition rows are row-normalised bigram counts (unseen successors keep probability 0; a token with no observed
  successor falls back to the marginal). Triggers are the ``num_triggers`` most frequent tokens.
  """
  if num_triggers < 1 or num_triggers >= num_chars:
    raise ValueError(f"num_triggers must be in [1, num_chars); got {num_triggers} with num_chars={num_chars}")
  counts = collections.Counter(text)
  if len(counts) < num_chars:
    raise ValueError(f"text has only {len(counts)} distinct characters; num_chars={num_chars}")
  # Ties broken by the character, so the vocabulary is a pure function of the text.
  top = sorted(counts, key=lambda c: (-counts[c], c))[:num_chars - 1]
  chars = tuple(top) + (OTHER,)
  index = {c: i for i, c in enumerate(top)}
  ids = np.array([index.get(c, num_chars - 1) for c in text], np.int64)
  vocab = num_chars + 2
  marginal = np.bincount(ids, minlength=vocab).astype(np.float64)
  marginal /= marginal.sum()
  bigram = np.zeros((vocab, vocab), np.float64)
  np.add.at(bigram, (ids[:-1], ids[1:]), 1.0)
  rows = bigram.sum(1, keepdims=True)
  transition = np.where(rows > 0, bigram / np.maximum(rows, 1.0), marginal[None, :])
  triggers = tuple(int(i) for i in np.argsort(-marginal, kind="stable")[:num_triggers])
  return BigramChain(chars, transition, marginal, triggers)


def read_corpus(corpus: str | None = None, *, hub: str | None = None, hub_config: str | None = None,
                split: str = "train", field: str = "text", max_chars: int = 2_000_000) -> str:
  """The text of a corpus: a local file (plain text read as is; JSON/parquet through ``datasets``) or a
  ``datasets`` hub source, documents joined by newlines, cut to ``max_chars`` characters."""
  if (corpus is None) == (hub is None):
    raise ValueError("give exactly one of corpus (a file) and corpus_hub (a datasets name)")
  if corpus is not None:
    sources.check_files((corpus,))
    builder = sources.builder_for("files", (corpus,))
    if builder == "text":
      with open(corpus, encoding="utf-8", errors="replace") as f:
        return f.read(max_chars)
    docs = sources.hf_documents(builder, data_files=(corpus,), text_field=field)
  else:
    docs = sources.hf_documents(hub, config_name=hub_config, split=split, text_field=field)
  parts, n = [], 0
  for d in docs:
    parts.append(d)
    n += len(d) + 1
    if n >= max_chars:
      break
  return "\n".join(parts)[:max_chars]


@functools.cache
def corpus_chain(corpus: str | None, hub: str | None, hub_config: str | None, split: str, field: str,
                 max_chars: int, num_chars: int = 65, num_triggers: int = 3) -> BigramChain:
  """The chain of a user corpus (:func:`read_corpus`; no reST cleaning: the text is taken as it is)."""
  text = read_corpus(corpus, hub=hub, hub_config=hub_config, split=split, field=field, max_chars=max_chars)
  where = corpus or hub
  if len(text) < 2:
    raise ValueError(f"BigramBackcopyConfig corpus {where!r} holds no text")
  try:
    return build_chain(text, num_chars=num_chars, num_triggers=num_triggers)
  except ValueError as e:
    raise ValueError(f"BigramBackcopyConfig corpus {where!r}: {e} (lower BigramBackcopyConfig.num_chars and set "
                     f"ModelConfig.vocab_size = num_chars + 2)") from None


@functools.cache
def default_chain(num_chars: int = 65, num_triggers: int = 3) -> BigramChain:
  """The chain attnlab ships: built from Python's embedded documentation text (``pydoc_data.topics``)."""
  from pydoc_data.topics import topics
  return build_chain(clean_text("\n".join(topics[k] for k in sorted(topics))), num_chars=num_chars,
                     num_triggers=num_triggers)


def _sample_rows(cdf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One categorical sample per row of a (B, V) cumulative distribution."""
  u = rng.random((cdf.shape[0], 1)) * cdf[:, -1:]
  return np.minimum((cdf <= u).sum(-1), cdf.shape[1] - 1)


def sample_sequences(chain: BigramChain, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """(batch, length) int32 BB sequences starting with ``<s>`` (feed ``x[:, :-1]``, predict ``x[:, 1:]``)."""
  if length < 2:
    raise ValueError(f"length must be >= 2 (BOS + one token); got {length}")
  is_trigger = np.zeros(chain.vocab_size, bool)
  is_trigger[list(chain.triggers)] = True
  first = chain.marginal.copy()
  first[is_trigger] = 0.0
  first[chain.bos_id] = 0.0
  cdf = np.cumsum(chain.transition, axis=1)
  seq = np.empty((batch, length), np.int64)
  seq[:, 0] = chain.bos_id
  seq[:, 1] = _sample_rows(np.broadcast_to(np.cumsum(first), (batch, chain.vocab_size)), rng)
  for t in range(2, length):
    cur, prev = seq[:, t - 1], seq[:, t - 2]
    seq[:, t] = np.where(is_trigger[cur], prev, _sample_rows(cdf[cur], rng))
  return seq.astype(np.int32)


def trigger_mask(chain: BigramChain, inputs: np.ndarray) -> np.ndarray:
  """True where the input token is a trigger, i.e. where the next token is a backcopy (Guo's ``triggers_pos``)."""
  return np.isin(np.asarray(inputs), np.asarray(chain.triggers))


class BigramBackcopy:
  """Fresh BB batches, a pure function of ``(seed, step)``: ``batch(step)`` -> (batch_size, seq_len + 1) int32."""

  def __init__(self, seq_len: int, batch_size: int, *, seed: int = 0, chain: BigramChain | None = None):
    if seq_len < 1 or batch_size < 1:
      raise ValueError(f"seq_len and batch_size must be positive; got {seq_len}, {batch_size}")
    self.chain = chain if chain is not None else default_chain()
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

  @property
  def vocab_size(self) -> int:
    return self.chain.vocab_size

  def batch(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    return sample_sequences(self.chain, self.batch_size, self.seq_len + 1, rng)

  def __iter__(self):
    step = 0
    while True:
      yield self.batch(step)
      step += 1


# ------------------------------------------------------------------------------------- the harness's synthetic task
@dataclasses.dataclass(frozen=True)
class BigramBackcopyConfig:
  """Bigram-Backcopy as a synthetic task of the training harness (one fresh row per example).

  The vocabulary is the chain's (``num_chars + 2`` ids: characters, ``<s>``, ``<d>``; 67 by default, so set
  ``ModelConfig.vocab_size`` to it); the loss covers every target, as in Guo et al.
  """

  num_chars: int = 65
  num_triggers: int = 3
  # The chain's corpus (module docstring): None -> the embedded text; a file path; or a datasets hub name.
  corpus: str | None = None
  corpus_hub: str | None = None
  corpus_config: str | None = None
  corpus_split: str = "train"
  corpus_field: str = "text"
  corpus_max_chars: int = 2_000_000

  def __post_init__(self):
    if self.corpus is not None and self.corpus_hub is not None:
      raise ValueError("BigramBackcopyConfig: set corpus (a file) or corpus_hub (a datasets name), not both")

  @property
  def chain(self) -> BigramChain:
    if self.corpus is None and self.corpus_hub is None:
      return default_chain(self.num_chars, self.num_triggers)
    return corpus_chain(self.corpus, self.corpus_hub, self.corpus_config, self.corpus_split, self.corpus_field,
                        self.corpus_max_chars, self.num_chars, self.num_triggers)

  @property
  def vocab_size(self) -> int:
    return self.num_chars + 2

  def probe_query_mask(self, inputs: np.ndarray) -> np.ndarray:
    """The queries the sink metrics average over: non-trigger positions (Guo et al.'s ``Attn_<s>``)."""
    return ~trigger_mask(self.chain, inputs)


@functools.cache
def _row_sampler(chain: BigramChain):
  """Python-list cumulative rows for a fast single-row sampler (one ``bisect`` per token)."""
  cdf = [list(np.cumsum(row)) for row in chain.transition]
  first = chain.marginal.copy()
  first[list(chain.triggers)] = 0.0
  first[chain.bos_id] = 0.0
  return cdf, list(np.cumsum(first)), frozenset(chain.triggers)


def sample_row(chain: BigramChain, length: int, rng: np.random.Generator) -> np.ndarray:
  """One BB sequence of ``length`` tokens (same law as :func:`sample_sequences`, ~20x faster for one row)."""
  if length < 2:
    raise ValueError(f"length must be >= 2 (BOS + one token); got {length}")
  cdf, first, triggers = _row_sampler(chain)
  u = rng.random(length).tolist()
  last = len(first) - 1
  seq = [chain.bos_id, min(bisect.bisect_right(first, u[1] * first[-1]), last)]
  for t in range(2, length):
    cur = seq[-1]
    if cur in triggers:
      seq.append(seq[-2])
    else:
      row = cdf[cur]
      seq.append(min(bisect.bisect_right(row, u[t] * row[-1]), last))
  return np.asarray(seq, np.int32)


@register_task(BigramBackcopyConfig)
def bigram_backcopy_row(cfg: BigramBackcopyConfig, rng: np.random.Generator, seq_len: int, tokenizer=None):
  """Harness generator: ``(tokens (seq_len + 1,), loss_mask (seq_len,))``; ``tokenizer`` is unused (own vocab)."""
  del tokenizer
  return sample_row(cfg.chain, seq_len + 1, rng), np.ones(seq_len, np.float32)
