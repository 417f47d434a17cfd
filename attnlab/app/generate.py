"""``attnlab generate``: continue a prompt with a workdir's model through the cache protocol.

The prompt is tokenized with the run's tokenizer and, as in training, opened with its BOS; the continuation is
:func:`attnlab.generate` (prefill in one call, one jitted step per token) under the cache policy given ("full",
"window:W", or StreamingLLM's "sink:S+W").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnlab.app.loading import load
from attnlab.data.tokenizer import make_tokenizer
from attnlab.inference import generate


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *, prompt: str | None,
        prompt_file: str | None, max_new_tokens: int, cache: str = "full", temperature: float = 0.0,
        top_k: int | None = None, seed: int = 0, step: int | None = None) -> int:
  """Prints the prompt's continuation. Exactly one of ``prompt`` / ``prompt_file`` is given."""
  if (prompt is None) == (prompt_file is None):
    raise ValueError("give exactly one of --prompt and --prompt_file")
  if prompt_file is not None:
    try:
      with open(prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"--prompt_file {prompt_file!r} cannot be read as UTF-8 text: {e}") from None
  model, cfg = load(workdir, step, gin_files=gin_files, bindings=bindings)
  tokenizer = make_tokenizer(cfg.data.tokenizer)
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)]).astype(np.int32)
  out = generate(model, ids, max_new_tokens, cache_policy=cache, temperature=temperature, top_k=top_k, seed=seed)
  print(prompt + tokenizer.decode(np.asarray(out[0]).tolist()))
  return 0
