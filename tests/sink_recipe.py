"""The tiny Bigram-Backcopy sink recipe (Guo et al. 2024, arXiv 2410.13835), as a test-only training function.

1 layer, 1 head, d = 64, ReLU FFN 4d, pre-LN LayerNorm (eps 1e-5), final LN, untied head, no Dense biases,
PyTorch-default init (Embed N(0, 1), Linear U(+-1/sqrt(fan_in))); AdamW 3e-4 (0.9, 0.99, eps 1e-8, wd 1e-4),
constant lr, batch 32 x seq 64, fresh batches every step, learned absolute positions (no RoPE), as in Guo et al.'s
``BBM/model.py``. With RoPE instead, softmax formed the sink in only 2 of 3 seeds (README, sink section).

The full sweep uses the training harness; this file exists so the calibration is a self-contained property test.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attnlab
from attnlab.analysis.metrics import model_metrics
from attnlab.data.bigram_backcopy import BigramBackcopy, default_chain, trigger_mask

SEQ, BATCH, EVAL_SEQS = 64, 32, 128


def recipe_config(score: str = "softmax", **score_params) -> attnlab.ModelConfig:
  return attnlab.ModelConfig(
      vocab_size=default_chain().vocab_size, d_model=64, num_layers=1, mlp_activation="relu", norm="layernorm",
      norm_eps=1e-5, init="pytorch", max_seq_len=SEQ, position_embedding="learned",
      attention=attnlab.AttentionConfig(num_heads=1, rope=False, score=score, score_params=score_params))


def make_step(lr: float = 3e-4):
  """A jitted AdamW train step (reuse it across models of one config to compile once)."""
  tx = optax.adamw(lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4)

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      logits = m(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  return tx, step


def train(cfg: attnlab.ModelConfig, *, seed: int, steps: int = 2000, step_fn=None):
  tx, step = step_fn if step_fn is not None else make_step()
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  data = BigramBackcopy(SEQ, BATCH, seed=seed + 1)
  for i in range(steps):
    step(model, opt, jnp.asarray(data.batch(i)))
  return model


@nnx.jit
def _forward(model, inputs):
  return model(inputs, return_internals=True)


def eval_batch() -> np.ndarray:
  """128 fixed held-out sequences (a seed no training run uses)."""
  return BigramBackcopy(SEQ, EVAL_SEQS, seed=10_000).batch(0)


def evaluate(model) -> dict[str, float]:
  """bos_attn (Guo's Attn_<s> at non-trigger queries t >= 1), Gu Sink_1^0.3 raw/proxy, value ratio, CE split."""
  batch = eval_batch()
  inputs, targets = batch[:, :-1], batch[:, 1:]
  logits, aux = _forward(model, jnp.asarray(inputs))
  non_trigger = ~trigger_mask(default_chain(), inputs)
  m = model_metrics(aux, k=1, eps=0.3, query_mask=jnp.asarray(non_trigger))
  ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(targets)))
  layer = m["layers"][0]
  return {
      "bos_attn": float(layer["first_token_attn_proxy"].mean()),
      "bos_raw": float(layer["first_token_attn_raw"].mean()),
      "row_mass": float(layer["row_mass"].mean()),
      "sink1_raw": float(layer["sink_rate_raw"].mean()),
      "sink1_proxy": float(layer["sink_rate_proxy"].mean()),
      "vratio": float(layer["value_norm_ratio"].mean()),
      "backcopy_ce": float(ce[~non_trigger].mean()),
      "bigram_ce": float(ce[non_trigger][:, None].mean()),
  }


ARMS = {"softmax": ("softmax", {}), "sigmoid": ("sigmoid", {}), "relu": ("relu", {}),
        "sigmoid_b0": ("sigmoid", {"b": 0.0})}

if __name__ == "__main__":  # calibration: python tests/sink_recipe.py ARM SEED [STEPS]
  import sys
  import time
  score, seed = sys.argv[1], int(sys.argv[2])
  steps = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
  t0 = time.time()
  name, params = ARMS[score]
  trained = train(recipe_config(name, **params), seed=seed, steps=steps)
  print(score, seed, steps, {k: round(v, 3) for k, v in evaluate(trained).items()}, f"{time.time() - t0:.1f}s")
