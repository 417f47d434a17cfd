"""Registry of attention modules, keyed by their config class.

Every attention module has the same constructor and call signature::

    Module(cfg: BaseAttentionConfig subclass, d_model: int, *, rngs: nnx.Rngs, init: str = "gpt", dtype=jnp.float32)
    module(x, *, positions, segment_ids=None, return_internals=False) -> (y, aux)

``x``/``y`` are (batch, seq, d_model); ``positions``/``segment_ids`` are (batch, seq) ints; ``aux`` is a dict that
may hold ``"aux_loss"`` (a scalar added to the LM loss) and, when ``return_internals``, analysis tensors
(``"weights"`` (batch, heads, q, k), ``"sink_mass"`` (batch, heads, q), ``"queries"``, ``"keys"``, ``"values"``).
A module whose class sets ``needs_tokens = True`` (landmark, meta tokens) is also called with ``tokens=`` the
(batch, seq) input ids by :class:`attnlab.model.lm.Block`.
Decoding modules also implement the cache protocol of :mod:`attnlab.attention.cache` (``init_cache``,
``prefill``, ``step``); :meth:`attnlab.model.lm.DecoderLM.init_cache` names the layer that lacks it.
Adding a variant = one new file (a config subclassing :class:`BaseAttentionConfig` plus the field mixins it
supports, and a module decorated with ``register_attention``) + one import line in
:mod:`attnlab.attention.variants`; from outside the package, the user's module calls ``register_attention``.
"""

from __future__ import annotations

from attnlab.attention.config import BaseAttentionConfig

_MODULES: dict[type, type] = {}
_NAMES: dict[str, type] = {}


def register_attention(name: str, config_cls: type[BaseAttentionConfig]):
  """Class decorator registering an attention module for ``config_cls`` under ``name``."""
  if not (isinstance(config_cls, type) and issubclass(config_cls, BaseAttentionConfig)):
    raise TypeError(f"register_attention({name!r}, ...) needs a BaseAttentionConfig subclass; got {config_cls!r}")

  def wrap(module_cls):
    if config_cls in _MODULES or name in _NAMES:
      raise ValueError(f"attention kind {name!r} / {config_cls.__name__} is already registered")
    _MODULES[config_cls] = module_cls
    _NAMES[name] = config_cls
    return module_cls

  return wrap


def attention_module_for(cfg: BaseAttentionConfig) -> type:
  try:
    return _MODULES[type(cfg)]
  except KeyError:
    raise ValueError(f"no attention module registered for {type(cfg).__name__}; known: {sorted(_NAMES)}") from None


def attention_config_class(name: str) -> type[BaseAttentionConfig]:
  try:
    return _NAMES[name]
  except KeyError:
    raise ValueError(f"unknown attention kind {name!r}; known: {sorted(_NAMES)}") from None


def attention_kinds() -> list[str]:
  return sorted(_NAMES)
