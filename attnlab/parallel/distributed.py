"""Multi-process start-up through JAX's own multi-controller runtime (``jax.distributed``), and a watchdog that
turns a lost peer into a clear, timely exit.

On TPU pods and SLURM/Open MPI clusters ``jax.distributed.initialize()`` detects everything itself; elsewhere
pass the coordinator address, process count and index (from config, CLI or the ``ATTNLAB_COORDINATOR``,
``ATTNLAB_NUM_PROCESSES``, ``ATTNLAB_PROCESS_ID`` environment variables). It must run before any other JAX call.

Failure handling: the coordinator binds only the address it was given (``coordinator_bind_address`` defaults to
``coordinator_address``, never all interfaces). JAX's runtime aborts the process (a C++ stack dump, rc -6) when
a peer is missing at start-up or stops heartbeating, after timeouts of minutes. Here JAX's own timeouts are set
past ours, and a watchdog thread exits first, with one line naming the lost process and exit code
:data:`LOST_PEER_EXIT`: during start-up when not every process joined within ``initialization_timeout``; later
when a peer's heartbeat (a counter each process bumps in the coordination service's key-value store) stops for
``heartbeat_timeout_seconds``, or when the coordinator (process 0) no longer answers for that long.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import re
import signal
import sys
import threading
import time

import jax
from jax._src import distributed as _jax_distributed  # the runtime client of jax.distributed (no public accessor)

from attnlab import fields

LOST_PEER_EXIT = 3
_JAX_MARGIN_S = 30  # JAX's own timeouts exceed ours by this much, so the watchdog always speaks first


def parse_address(value, field: str = "coordinator_address") -> tuple[str, int]:
  """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ValueError naming the field otherwise."""
  if not isinstance(value, str) or ":" not in value:
    raise ValueError(f"{field} must look like host:port; got {value!r}")
  host, _, port = value.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{field} must look like host:port with a port in 1..65535; got {value!r}")
  return host, int(port)


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  coordinator_address: str | None = None  # "host:port" of process 0
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  auto: bool = False  # let JAX detect the cluster (TPU pods, SLURM, Open MPI)
  initialization_timeout: int = 60  # seconds for every process to join
  heartbeat_timeout_seconds: int = 60  # a peer silent this long counts as lost
  coordinator_bind_address: str | None = None  # None -> coordinator_address (never all interfaces)

  def __post_init__(self):
    o = "DistributedConfig"
    if self.coordinator_address is not None:
      parse_address(self.coordinator_address, f"{o}.coordinator_address")
    if self.coordinator_bind_address is not None:
      parse_address(self.coordinator_bind_address, f"{o}.coordinator_bind_address")
    fields.integer(o, "num_processes", self.num_processes, allow_none=True)
    fields.integer(o, "process_id", self.process_id, minimum=0, allow_none=True)
    fields.integer(o, "initialization_timeout", self.initialization_timeout)
    fields.integer(o, "heartbeat_timeout_seconds", self.heartbeat_timeout_seconds)
    fields.boolean(o, "auto", self.auto)

  @classmethod
  def from_env(cls, base: "DistributedConfig | None" = None) -> "DistributedConfig":
    base = base or cls()
    env = os.environ

    def env_int(name, default):
      if name not in env:
        return default
      try:
        return int(env[name])
      except ValueError:
        raise ValueError(f"environment variable {name} must be an int; got {env[name]!r}") from None

    return dataclasses.replace(
        base,
        coordinator_address=env.get("ATTNLAB_COORDINATOR", base.coordinator_address),
        num_processes=env_int("ATTNLAB_NUM_PROCESSES", base.num_processes),
        process_id=env_int("ATTNLAB_PROCESS_ID", base.process_id))

  @property
  def enabled(self) -> bool:
    return self.auto or self.coordinator_address is not None


def check(cfg: DistributedConfig) -> None:
  """The start-up settings make sense together (ValueError naming them otherwise)."""
  if cfg.auto:
    return
  if cfg.coordinator_address is None:
    if (cfg.num_processes or 1) > 1 or (cfg.process_id or 0) > 0:
      raise ValueError(f"num_processes ({cfg.num_processes}) / process_id ({cfg.process_id}) without a coordinator "
                       "address: give --coordinator HOST:PORT (or ATTNLAB_COORDINATOR), or --distributed_auto")
    return
  if cfg.num_processes is None or cfg.process_id is None:
    raise ValueError("distributed start-up needs num_processes and process_id with coordinator_address "
                     f"{cfg.coordinator_address!r} (got num_processes={cfg.num_processes}, "
                     f"process_id={cfg.process_id})")
  if not 0 <= cfg.process_id < cfg.num_processes:
    raise ValueError(f"process_id {cfg.process_id} is outside [0, {cfg.num_processes}) (num_processes)")


def _lost(message: str) -> None:
  """One line, then exit at once: no Python or C++ teardown that could block on, or abort over, the dead peer."""
  try:
    sys.stdout.flush()
  except Exception:  # noqa: BLE001
    pass
  os.write(2, f"attnlab: error: {message}\n".encode())
  os._exit(LOST_PEER_EXIT)


class Watchdog:
  """Peer liveness over the coordination service's key-value store (see the module docstring)."""

  def __init__(self, cfg: DistributedConfig):
    self.cfg = cfg
    self.timeout = cfg.heartbeat_timeout_seconds
    self.interval = max(0.2, min(2.0, self.timeout / 8))
    self._stop = threading.Event()
    self._thread = None

  def start_joining(self) -> "Watchdog":
    """Exit when ``jax.distributed.initialize`` has not returned within ``initialization_timeout``."""
    cfg, joined = self.cfg, threading.Event()
    self._joined = joined

    def wait():
      if not joined.wait(cfg.initialization_timeout):
        who = (f"the coordinator {cfg.coordinator_address} (process 0) did not answer" if cfg.process_id else
               f"not every one of the {cfg.num_processes} processes joined (missing: processes "
               f"{', '.join(map(str, range(1, cfg.num_processes)))} or some of them)")
        _lost(f"process {cfg.process_id}: {who} within initialization_timeout={cfg.initialization_timeout} s")

    threading.Thread(target=wait, name="attnlab-join-watchdog", daemon=True).start()
    return self

  def joined(self) -> None:
    self._joined.set()

  def start(self) -> "Watchdog":
    client = _jax_distributed.global_state.client
    if client is None:
      return self
    self._thread = threading.Thread(target=self._run, args=(client,), name="attnlab-peer-watchdog", daemon=True)
    self._thread.start()
    atexit.register(self._leave, client)  # runs before jax.distributed's own shutdown (registered earlier)
    return self

  def _leave(self, client) -> None:
    """A normal exit: tell the peers this process left on purpose (they stop watching it)."""
    self.stop()
    try:
      client.key_value_set(f"attnlab/alive/{self.cfg.process_id}", "done", allow_overwrite=True)
    except Exception:  # noqa: BLE001
      pass

  def _run(self, client) -> None:
    me, n = self.cfg.process_id, self.cfg.num_processes
    beats, seen = 0, {q: (None, time.monotonic()) for q in range(n) if q != me}
    failing_since = None
    while not self._stop.wait(self.interval):
      now = time.monotonic()
      try:
        beats += 1
        client.key_value_set(f"attnlab/alive/{me}", str(beats), allow_overwrite=True)
        for q in seen:
          value = client.key_value_try_get(f"attnlab/alive/{q}")
          if value != seen[q][0]:
            seen[q] = (value, now)
        for q in [q for q, (v, _) in seen.items() if v == "done"]:
          del seen[q]
        failing_since = None
      except Exception as e:  # noqa: BLE001 (the coordinator is gone or unreachable)
        if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
          failing_since = None
        else:
          failing_since = failing_since or now
          if now - failing_since > self.timeout:
            _lost(f"process {me}: lost process 0 (the coordinator {self.cfg.coordinator_address} stopped answering "
                  f"for {self.timeout} s)")
          continue
      for q, (_, t) in seen.items():
        if now - t > self.timeout:
          _lost(f"process {me}: lost process {q} (no heartbeat for {self.timeout} s, "
                f"heartbeat_timeout_seconds={self.timeout})")

  def stop(self) -> None:
    self._stop.set()


_WATCHDOG: Watchdog | None = None


def _fatal_callback(cfg: DistributedConfig):
  """Replaces the runtime client's default reaction to an error polled from the coordination service (a C++
  ``LOG(QFATAL)`` abort with a stack dump, rc -6) by one line naming the lost process and exit code 3."""

  def on_error(*args) -> None:
    status = " ".join(" ".join(str(a).split()) for a in args)[:300]
    tasks = [int(t) for t in re.findall(r"task:(\d+)", status) if int(t) != cfg.process_id]
    if tasks:
      who = f"lost process {tasks[0]}"
    elif cfg.process_id != 0:
      who = f"lost process 0 (the coordinator {cfg.coordinator_address})"
    else:
      who = "lost a peer process"
    _lost(f"process {cfg.process_id}: {who} ({status})")

  return on_error


_ABORT_HANDLER = None
_ABORT_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _exit_on_runtime_abort(cfg: DistributedConfig) -> None:
  """When JAX's runtime aborts over a lost peer (``std::terminate`` / ``LOG(FATAL)`` in one of its threads: the
  coordinator's socket closed), exit with one line and code 3 instead of a core dump (a C-level SIGABRT handler;
  Python-level handlers cannot intercept ``abort()``)."""
  global _ABORT_HANDLER
  try:
    libc = ctypes.CDLL(None)
    libc.signal.argtypes = [ctypes.c_int, _ABORT_HANDLER_TYPE]
    libc.signal.restype = ctypes.c_void_p
  except (OSError, AttributeError):
    return
  who = "lost process 0 (the coordinator " + str(cfg.coordinator_address) + ")" if cfg.process_id else \
      "lost a peer process"
  _ABORT_HANDLER = _ABORT_HANDLER_TYPE(
      lambda signum: _lost(f"process {cfg.process_id}: {who}; the JAX distributed runtime stopped"))
  libc.signal(signal.SIGABRT, _ABORT_HANDLER)


class _ClientWithCallback:
  """``jax._src.lib._jax`` with ``get_distributed_runtime_client`` given our error callback (JAX's initialize has
  no parameter for it)."""

  def __init__(self, module, callback):
    self._module, self._callback = module, callback

  def __getattr__(self, name):
    return getattr(self._module, name)

  def get_distributed_runtime_client(self, *args, **kwargs):
    kwargs.setdefault("missed_heartbeat_callback", self._callback)
    return self._module.get_distributed_runtime_client(*args, **kwargs)


def initialize(cfg: DistributedConfig) -> None:
  """Starts the multi-controller runtime (and the watchdog) when ``cfg`` asks for it; a no-op for single-process
  runs. A process id or count without a coordinator is a ValueError."""
  global _WATCHDOG
  check(cfg)
  if not cfg.enabled:
    return
  if cfg.auto:
    jax.distributed.initialize()
    return
  watchdog = Watchdog(cfg).start_joining()
  lib = getattr(_jax_distributed, "_jax", None)
  if lib is not None:
    _jax_distributed._jax = _ClientWithCallback(lib, _fatal_callback(cfg))
  try:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id, local_device_ids=cfg.local_device_ids,
                               initialization_timeout=cfg.initialization_timeout + _JAX_MARGIN_S,
                               heartbeat_timeout_seconds=2 * cfg.heartbeat_timeout_seconds + _JAX_MARGIN_S,
                               coordinator_bind_address=cfg.coordinator_bind_address or cfg.coordinator_address)
  finally:
    if lib is not None:
      _jax_distributed._jax = lib
  watchdog.joined()
  _WATCHDOG = watchdog.start()
  _exit_on_runtime_abort(cfg)


def shutdown_watchdog() -> None:
  """Stops the peer watchdog (before a deliberate shutdown, when peers may leave first)."""
  if _WATCHDOG is not None:
    _WATCHDOG.stop()


def multi_process() -> bool:
  """True when this process is one of several of a ``jax.distributed`` run."""
  return _jax_distributed.global_state.client is not None


def is_main_process() -> bool:
  """True on the process that writes logs (process 0)."""
  return jax.process_index() == 0
