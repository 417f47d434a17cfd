"""The ``attnlab`` command line. (Interim: ``demo`` trains a tiny byte-level LM for a few steps; the full
train/eval/sinks commands arrive with the training harness.)"""

from __future__ import annotations

import argparse
import sys
import time


def _demo(steps: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from pydoc_data.topics import topics

  import attnlab

  text = "\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
  data = np.frombuffer(text, np.uint8).astype(np.int32)
  cfg = attnlab.ModelConfig(d_model=128, num_layers=2, attention=attnlab.AttentionConfig(num_heads=4))
  model = attnlab.DecoderLM(cfg, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch):
    def loss_fn(m):
      logits = m(batch[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  t0 = time.time()
  for i in range(steps):
    starts = rng.integers(0, len(data) - 129, size=16)
    loss = step(model, opt, jnp.asarray(np.stack([data[s:s + 129] for s in starts])))
    if i % 10 == 0 or i == steps - 1:
      print(f"step {i:4d}  loss {float(loss):.3f}  ({time.time() - t0:.1f}s)", flush=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="attnlab")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser("demo", help="train a tiny byte-level LM on the embedded corpus")
  demo.add_argument("--steps", type=int, default=100)
  args = parser.parse_args(argv)
  if args.command == "demo":
    _demo(args.steps)
  return 0


if __name__ == "__main__":
  sys.exit(main())
