"""The embedded default corpus: the English reference text of ``pydoc_data.topics``.

It ships with every CPython install (no network, no download): 79 documents ("topics" of the Python language
reference used by ``help()``), about 466 KB of UTF-8 text in CPython 3.11. License: the Python documentation is
distributed under the PSF License Agreement (https://docs.python.org/3/license.html), like CPython itself.
Held-out split: every 16th topic in sorted order (5 topics, about 5% of the text), so no text is shared.
"""

from __future__ import annotations

HELDOUT_EVERY = 16


def embedded_documents(split: str = "train") -> list[str]:
  """The documents of the embedded corpus for ``split`` ("train" or "validation"), in a fixed order."""
  from pydoc_data.topics import topics

  if split not in ("train", "validation"):
    raise ValueError(f"split must be 'train' or 'validation'; got {split!r}")
  keys = sorted(topics)
  held = split == "validation"
  return [topics[k] for i, k in enumerate(keys) if (i % HELDOUT_EVERY == HELDOUT_EVERY // 2) == held]
