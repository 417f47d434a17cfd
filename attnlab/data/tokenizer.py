"""Tokenizers: the default byte-level tokenizer and an optional Hugging Face ``tokenizers`` one.

Byte-level ids: ``0..255`` are the UTF-8 bytes, ``256 = BOS``, ``257 = EOS``, ``258 = PAD`` (vocab 259, the
``ModelConfig.vocab_size`` default).
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids) -> str: ...

  def byte_lengths(self) -> np.ndarray:
    """(vocab,) number of UTF-8 bytes each token stands for (0 for specials); used for bits-per-byte."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens plus BOS/EOS/PAD."""

  vocab_size = BYTE_VOCAB_SIZE
  bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def byte_lengths(self) -> np.ndarray:
    return (np.arange(self.vocab_size) < 256).astype(np.int32)


class HFTokenizer:
  """A Hugging Face ``tokenizers`` tokenizer from a local ``tokenizer.json``. BOS/EOS/PAD are looked up by the
  given token strings; missing specials are appended after the tokenizer's vocabulary."""

  def __init__(self, path: str, *, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>"):
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file {path!r} does not exist")
    from tokenizers import Tokenizer as _Tok  # optional dependency (extra "hf")
    self._tok = _load(_Tok, path)
    base = self._tok.get_vocab_size(with_added_tokens=True)
    extra = 0
    ids = []
    for s in (bos, eos, pad):
      i = self._tok.token_to_id(s)
      if i is None:
        i, extra = base + extra, extra + 1
      ids.append(i)
    self.bos_id, self.eos_id, self.pad_id = ids
    self.vocab_size = base + extra

  @classmethod
  def from_pretrained_dir(cls, directory: str) -> HFTokenizer:
    """The tokenizer of a Hugging Face checkpoint directory (``tokenizer.json``) with BOS/EOS/PAD taken from its
    own files: ``tokenizer_config.json``, ``special_tokens_map.json``, then ``config.json``'s ``*_token_id``. A
    tokenizer without a BOS (Qwen) or PAD (GPT-2, Llama) uses its EOS for them. ``add_bos`` records whether the
    tokenizer's own post-processor prepends BOS (Llama, Mistral) or not (GPT-2, Pythia, Qwen); ``vocab_size`` is
    the tokenizer's own (no ids are appended)."""
    path = os.path.join(directory, "tokenizer.json")
    if not os.path.isfile(path):
      raise ValueError(f"tokenizer file {path!r} does not exist")
    from tokenizers import Tokenizer as _Tok  # optional dependency (extra "hf")
    self = cls.__new__(cls)
    self._tok = _Tok.from_file(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    files = [_read_json(os.path.join(directory, f)) for f in ("tokenizer_config.json", "special_tokens_map.json")]
    model_cfg = _read_json(os.path.join(directory, "config.json"))
    ids = {}
    for role in ("bos", "eos", "pad"):
      token = next((f[role + "_token"] for f in files if f.get(role + "_token") is not None), None)
      if isinstance(token, dict):
        token = token.get("content")
      i = self._tok.token_to_id(token) if isinstance(token, str) else None
      if token is not None and i is None:
        raise ValueError(f"{directory}: {role}_token {token!r} is not in tokenizer.json")
      if i is None and isinstance(model_cfg.get(role + "_token_id"), int):
        i = model_cfg[role + "_token_id"]
      ids[role] = i
    if ids["eos"] is None:
      raise ValueError(f"{directory}: no eos_token in tokenizer_config.json / special_tokens_map.json and no "
                       "eos_token_id in config.json")
    self.eos_id = ids["eos"]
    self.bos_id = self.eos_id if ids["bos"] is None else ids["bos"]
    self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]
    probe = self._tok.encode("a", add_special_tokens=True).ids
    self.add_bos = ids["bos"] is not None and bool(probe) and probe[0] == ids["bos"]
    return self

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    specials = {self.bos_id, self.eos_id, self.pad_id}
    return self._tok.decode([int(i) for i in ids if int(i) not in specials])

  def byte_lengths(self) -> np.ndarray:
    out = np.zeros(self.vocab_size, np.int32)
    specials = {self.bos_id, self.eos_id, self.pad_id}
    for i in range(self._tok.get_vocab_size(with_added_tokens=True)):
      if i not in specials:
        out[i] = len(self._tok.decode([i]).encode("utf-8"))
    return out


def _load(tok_cls, path: str):
  try:
    return tok_cls.from_file(path)
  except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception on a malformed file)
    raise ValueError(f"tokenizer file {path!r} is not a valid tokenizer.json ({' '.join(str(e).split())[:200]})") \
        from None


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable ({e})") from None
  return out if isinstance(out, dict) else {}


def make_tokenizer(spec: str = "byte") -> Tokenizer:
  """``"byte"``, the path of a local ``tokenizer.json`` (BOS/EOS/PAD looked up as ``<s>``, ``</s>``, ``<pad>``), or
  a directory holding a Hugging Face checkpoint's tokenizer files (BOS/EOS/PAD from its own files, see
  :meth:`HFTokenizer.from_pretrained_dir`; what ``attnlab import`` writes)."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"DataConfig.tokenizer must be 'byte', the path of a tokenizer.json or a tokenizer directory; "
                     f"got {spec!r}")
  if spec == "byte":
    return ByteTokenizer()
  return HFTokenizer.from_pretrained_dir(spec) if os.path.isdir(spec) else HFTokenizer(spec)


def check_fits_vocab(tokenizer: Tokenizer, vocab_size: int, where: str) -> None:
  """A tokenizer whose ids (its vocabulary, BOS/EOS/PAD) reach past the model's ``vocab_size`` is an error: they
  would index past the embedding table (NaN losses)."""
  special = {"BOS": tokenizer.bos_id, "EOS": tokenizer.eos_id, "PAD": tokenizer.pad_id}
  if tokenizer.vocab_size > vocab_size or max(special.values()) >= vocab_size:
    raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids ("
                     + ", ".join(f"{k} {v}" for k, v in special.items())
                     + f"), which do not fit ModelConfig.vocab_size ({vocab_size}); set ModelConfig.vocab_size >= "
                     f"{max(tokenizer.vocab_size, max(special.values()) + 1)}")
