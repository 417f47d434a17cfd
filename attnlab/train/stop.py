"""SIGTERM/SIGINT as a request to stop: the process-wide flag the train loop checks between steps.

The CLI installs the handlers as its first act (:func:`install`), so a signal during start-up (config, data,
compilation, restore) is remembered too: the loop then stops before its first step and writes nothing. Library
callers get the handlers for the duration of :func:`train` (``with installed():``)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
  """The first SIGTERM/SIGINT received since :meth:`clear` (None: none)."""

  def __init__(self):
    self.signal: int | None = None
    self._old: dict = {}

  def _handle(self, signum, frame):
    if self.signal is None:
      self.signal = signum

  @property
  def requested(self) -> bool:
    return self.signal is not None

  def clear(self) -> None:
    self.signal = None

  def install(self) -> bool:
    """Installs the handlers (main thread only); False if they already were or cannot be."""
    if self._old or threading.current_thread() is not threading.main_thread():
      return False
    for s in SIGNALS:
      self._old[s] = signal.signal(s, self._handle)
    return True

  def uninstall(self) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}


STOP = StopFlag()


def install() -> None:
  STOP.install()


@contextlib.contextmanager
def installed():
  """The handlers for the duration of the block (left alone if the CLI installed them already)."""
  mine = STOP.install()
  try:
    yield STOP
  finally:
    if mine:
      STOP.uninstall()


FAILPOINT_ENV = "ATTNLAB_FAILPOINT"
_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
  """Fault injection for the tests (``tests/test_faults.py``): with ``ATTNLAB_FAILPOINT=PHASE[:SIGNAL[:N]]`` in the
  environment, the N-th time (default 1st) this process reaches ``failpoint(PHASE)`` it sends itself SIGNAL
  (``TERM``, ``INT`` or ``KILL``; default ``TERM``). Phases: ``config`` (configuration built), ``data`` (data and
  tokenizer opened), ``state`` (train state built), ``restore`` (checkpoint restored), ``step`` (a step
  dispatched), ``save`` (an asynchronous checkpoint write in flight), ``eval`` (the final evaluation begins).
  Without the variable: nothing."""
  spec = os.environ.get(FAILPOINT_ENV)
  if not spec:
    return
  parts = spec.split(":")
  phase, sig, nth = parts[0], parts[1] if len(parts) > 1 else "TERM", parts[2] if len(parts) > 2 else "1"
  if phase != name:
    return
  _HITS[name] = _HITS.get(name, 0) + 1
  if _HITS[name] == int(nth):
    os.kill(os.getpid(), getattr(signal, "SIG" + sig))
