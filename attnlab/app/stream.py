"""``attnlab stream``: the StreamingLLM perplexity table of a run's newest checkpoint (``workdir/streaming/``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.app.workdir import open_workdir
from attnlab.state import restore_state
from attnlab.streaming.workdir import write_run_streaming_report


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = (), length: int = 512, num_streams: int = 4, window: int | None = None,
        n_sink: int = 4) -> int:
  cfg = open_workdir(workdir, gin_files, bindings, search_paths=search_paths)
  _, eval_graphdef, state = restore_state(cfg, workdir)
  print(write_run_streaming_report(cfg, workdir, eval_graphdef, state, length=length, num_streams=num_streams,
                                   window=window, n_sink=n_sink))
  print(f"wrote {os.path.join(workdir, 'streaming')}/streaming.md/.json/.png")
  return 0
