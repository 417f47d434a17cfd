"""Softmax attention with optional per-head sink logits.

    p_ij = exp(s_ij) / (sum_{j visible} exp(s_ij) + exp(sink_h))

``sink_h`` is a per-head "attend to nothing" logit (gpt-oss; Miller's softmax-off-by-one is ``sink_h = 0``,
StreamingLLM's "Zero Sink": Xiao et al., "Efficient Streaming Language Models with Attention Sinks", arXiv 2309.17453;
gpt-oss: OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", arXiv 2508.10925). Without sinks this is Vaswani et al.,
"Attention Is All You Need" (2017, arXiv 1706.03762). The sink term is combined in log space
(``logsumexp([s, sink])``), which is the correct form (see torchtitan PR #2211 for a wrong ``sigmoid(lse - sink)``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from attnlab.ops.scores.registry import Blockwise, register_score


@dataclasses.dataclass(frozen=True)
class SoftmaxBlockwise(Blockwise):
  """Online softmax (Milakov & Gimelshein 2018; FlashAttention): u = d = exp(s - m), D = l, r = log-sum-exp.

  A sink logit is a virtual key with value 0: the kernel starts from m = sink, l = 1.
  dL/ds = p (dp - delta).
  """

  online = True
  init_shift = -math.inf

  def block(self, s, m, n):
    e = jnp.exp(s - m)
    return e, e

  def denominator(self, l, m, n):
    return l

  def probs(self, s, r, n):
    return jnp.exp(s - r)

  def dlogits(self, s, r, dp, delta, n):
    return jnp.exp(s - r) * (dp - delta)


def softmax_blockwise(ctx):
  del ctx
  return SoftmaxBlockwise()


@register_score("softmax", supports_sink_logits=True, blockwise=softmax_blockwise)
def softmax_weights(s, mask, *, sink_logits=None, ctx=None):
  """p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)); masked -> 0; empty row without sink -> 0.

  Built on ``jax.nn.softmax`` (max-shifted, with its cheap custom VJP): masked logits become the most negative
  finite float, so they get weight exactly 0 next to any visible key (or the sink), and an all-masked row
  becomes uniform before the final ``where`` zeroes it, without NaNs in the forward or the gradient.
  """
  del ctx
  s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
  if sink_logits is None:
    p = jax.nn.softmax(s, axis=-1)
  else:
    sink = jnp.broadcast_to(sink_logits.astype(s.dtype), s.shape[:-1] + (1,))
    p = jax.nn.softmax(jnp.concatenate([s, sink], axis=-1), axis=-1)[..., :-1]
  return jnp.where(mask, p, 0.0)
