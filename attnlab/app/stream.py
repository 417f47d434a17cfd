"""``attnlab stream``: StreamingLLM perplexity of a run's newest checkpoint, for several cache sizes, sink counts
and position modes in one call (``workdir/streaming/<setting>/`` each, the table in ``workdir/streaming/``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from attnlab.analysis.workdir import restore_step
from attnlab.app.workdir import open_workdir
from attnlab.streaming.workdir import write_run_streaming_report


def run(workdir: str, gin_files: Sequence[str] = (), bindings: Sequence[str] = (), *,
        search_paths: Sequence[str] = (), length: int = 512, num_streams: int = 4,
        windows: Sequence[int] | None = None, n_sinks: Sequence[int] = (4,), pos_shift: str = "on") -> int:
  cfg = open_workdir(workdir, gin_files, bindings, search_paths=search_paths)
  _, eval_graphdef, state = restore_step(cfg, workdir)
  shifts = {"on": (True,), "off": (False,), "both": (True, False)}[pos_shift]
  print(write_run_streaming_report(cfg, workdir, eval_graphdef, state, length=length, num_streams=num_streams,
                                   windows=windows, n_sinks=tuple(n_sinks), pos_shifts=shifts))
  print(os.path.join(workdir, "streaming", "streaming.md"))
  return 0
