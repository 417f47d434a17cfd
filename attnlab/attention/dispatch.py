"""``attend``: one attention call, run by the first backend of a table that accepts it.

A backend is a name, a function that says why it cannot run a call (``None`` when it can), the platforms on which
``impl="auto"`` considers it (and, optionally, for which calls), and the function that runs it. ``impl="<name>"``
asks for one backend (a ValueError naming the reason when it declines); ``impl="auto"`` walks the table in order
and falls through to the next backend whenever one declines, ending at the dense path, which takes every call.

The table, in ``impl="auto"``'s order:
  * "pallas" (GPU/TPU): the flash kernel whenever :func:`kernels_pallas.flash.flash_unsupported` accepts the call
    -- it applies the kernel's own block-size resolution, so decode steps, odd lengths and small head dims fall
    through instead of raising;
  * "blocked" (every platform; on CPU only from ``BLOCKED_CPU_MIN_LEN`` keys on, the measured crossover): the
    pure-JAX flash path of :mod:`attnlab.attention.blocked`;
  * "xla": the dense path (:func:`attnlab.ops.dense.dense_attention`), which takes every call; on CPU it runs the
    batch in cache-sized chunks (:func:`attnlab.ops.dense.cpu_batch_chunk`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

from attnlab.attention.blocked import blocked_attention, blocked_unsupported
from attnlab.ops.dense import check_inputs, cpu_batch_chunk, dense_attention
from attnlab.ops.masks import check_window
from attnlab.ops.scores import get_score
from kernels_pallas.flash import flash_attention, flash_unsupported

# impl="auto" on CPU: the blocked path from this many keys on (and q_len > 1), the dense path below. Measured with
# benchmarks/blocked_cpu.py (fwd+bwd, causal, f32) on an idle machine: blocked 1.4-1.5x slower at 256-512 keys,
# faster from 1k (see benchmarks/results/blocked_cpu.json).
BLOCKED_CPU_MIN_LEN = 1024


@dataclasses.dataclass(frozen=True)
class Backend:
  """One way to run :func:`attend`.

  ``unsupported(q, k, v, *, score, causal, window, bias, mask, segment_ids, sink_logits, score_params)`` returns
  the reason this backend cannot run the call, or None; ``run`` takes :func:`attend`'s arguments less ``impl``.
  ``auto_platforms``: the ``jax.default_backend()`` values on which ``impl="auto"`` tries this backend;
  ``auto_when(platform, q, k, v, **call)``: optionally narrows that to the calls where it is the faster choice.
  """

  name: str
  run: Callable[..., jax.Array]
  unsupported: Callable[..., str | None]
  auto_platforms: tuple[str, ...]
  auto_when: Callable[..., bool] | None = None

  def auto_accepts(self, platform: str, q, k, v, **call) -> bool:
    if platform not in self.auto_platforms:
      return False
    if self.auto_when is not None and not self.auto_when(platform, q, k, v, **call):
      return False
    return self.unsupported(q, k, v, **call) is None


def _dense_unsupported(q, k, v, **_) -> None:
  del q, k, v


def _dense_run(q, k, v, **kwargs):
  """The dense path; on CPU in cache-sized batch chunks (:func:`attnlab.ops.dense.cpu_batch_chunk`)."""
  chunk = None
  if jax.default_backend() == "cpu":
    chunk = cpu_batch_chunk(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
  return dense_attention(q, k, v, batch_chunk=chunk, **kwargs)


def _flash_run(q, k, v, *, bias, mask, **kwargs):
  del bias, mask  # always None here: the kernel declines calls that carry them
  return flash_attention(q, k, v, **kwargs)


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, before: str | None = None) -> None:
  """Adds ``backend`` to the table (ahead of ``before`` in ``impl="auto"``'s order, else at the end)."""
  if backend.name in _BACKENDS or backend.name == "auto":
    raise ValueError(f"attention backend {backend.name!r} is already registered")
  items = list(_BACKENDS.items())
  at = len(items) if before is None else [name for name, _ in items].index(before)
  items.insert(at, (backend.name, backend))
  _BACKENDS.clear()
  _BACKENDS.update(items)


def _blocked_run(q, k, v, *, bias, mask, **kwargs):
  del bias, mask  # always None here: the blocked path declines calls that carry them
  return blocked_attention(q, k, v, **kwargs)


def _blocked_auto_when(platform: str, q, k, v, **_) -> bool:
  """On CPU the dense path wins for short sequences and single-query decode steps (measured crossover)."""
  del v
  return platform != "cpu" or (q.shape[1] > 1 and k.shape[1] >= BLOCKED_CPU_MIN_LEN)


register_backend(Backend("xla", _dense_run, _dense_unsupported, ("cpu", "gpu", "tpu")))
register_backend(Backend("pallas", _flash_run, flash_unsupported, ("gpu", "tpu")), before="xla")
register_backend(Backend("blocked", _blocked_run, blocked_unsupported, ("cpu", "gpu", "tpu"), _blocked_auto_when),
                 before="xla")


def implementations() -> tuple[str, ...]:
  """The values ``attend(impl=...)`` accepts: every registered backend and "auto"."""
  return (*_BACKENDS, "auto")


def select_backend(impl: str, q, k, v, **call) -> Backend:
  """The backend that runs this call under ``impl``; ValueError if ``impl`` names one that declines it."""
  if impl == "auto":
    platform = jax.default_backend()
    for backend in _BACKENDS.values():
      if backend.auto_accepts(platform, q, k, v, **call):
        return backend
    raise ValueError("no attention backend accepts this call")
  if impl not in _BACKENDS:
    raise ValueError(f"impl must be one of {implementations()}; got {impl!r}")
  backend = _BACKENDS[impl]
  reason = backend.unsupported(q, k, v, **call)
  if reason is not None:
    raise ValueError(f"impl={impl!r} cannot run this call: {reason}; use impl='xla' or 'auto'")
  return backend


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, score: str = "softmax", causal: bool = True,
           window: int | None = None, scale: float | None = None, bias: jax.Array | None = None,
           mask: jax.Array | None = None, segment_ids: Any = None, sink_logits: jax.Array | None = None,
           impl: str = "xla", **score_params) -> jax.Array:
  """Attention ``o_i = sum_j p_ij v_j`` with ``p = score(scale * q k^T + bias)`` over visible keys.

  Args:
    q: (batch, q_len, num_heads, head_dim). k, v: (batch, kv_len, num_kv_heads, head_dim).
    score: registered score-function name ("softmax", "sigmoid", "softplus", "softpick", "relu", ...).
    causal: causal mask with queries aligned to the end of the keys when ``q_len < kv_len``.
    window: sliding-window (local) attention: the query at absolute position ``p = i + kv_len - q_len`` sees only
      keys ``p - window < j <= p`` (itself and the ``window - 1`` before it; Mistral, Gemma and gpt-oss local
      layers, StreamingLLM's window baseline). It implies the causal upper bound and is ANDed with the causal,
      segment and ``mask`` masks. Every backend gets it; one that cannot apply it declines.
    scale: logit scale; default ``1/sqrt(head_dim)`` (softplus defaults to ``log(head_dim)``).
    bias: additive logit bias broadcastable to (batch, num_heads, q_len, kv_len).
    mask: boolean mask broadcastable to (batch, num_heads, q_len, kv_len); True = may attend. ANDed with the
      causal and segment masks. Masked entries get weight exactly 0 for every score function.
    segment_ids: (batch, seq) int ids when ``q_len == kv_len``, or a ``(q_ids, kv_ids)`` pair; tokens attend
      only within their segment (packing).
    sink_logits: (num_heads,) per-head sink logit (softmax only): adds ``exp(sink_h)`` to the denominator.
    impl: a registered backend -- "xla" (dense, :func:`attnlab.ops.dense.dense_attention`), "pallas"
      (the flash kernel of :mod:`kernels_pallas.flash`), "blocked" (flash-style in pure JAX,
      :mod:`attnlab.attention.blocked`) -- or "auto": the first backend in the table that accepts the call on this
      platform (GPU/TPU: the kernel, else blocked, else dense; CPU: blocked from ``BLOCKED_CPU_MIN_LEN`` keys on,
      else dense).
    **score_params: parameters of the score function (e.g. ``b``/``normalize`` for sigmoid).

  Returns:
    (batch, q_len, num_heads, head_dim) in ``q.dtype``; a query with no visible key returns 0.
  """
  check_inputs(q, k, v)
  get_score(score).check_params(score_params)
  window = check_window(window)
  call = dict(score=score, causal=causal, window=window, bias=bias, mask=mask, segment_ids=segment_ids,
              sink_logits=sink_logits, score_params=score_params)
  backend = select_backend(impl, q, k, v, **call)
  return backend.run(q, k, v, score=score, causal=causal, window=window, scale=scale, bias=bias, mask=mask,
                     segment_ids=segment_ids, sink_logits=sink_logits, **score_params)
