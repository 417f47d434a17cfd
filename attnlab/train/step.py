"""The jitted train step (NNX split/merge + ``jax.jit`` with the state donated).

The train state is :mod:`attnlab.state.train_state`'s dict (``params``, ``rest``, ``opt_state``, ``step``). The
forward runs on ``nnx.merge(graphdef, params, rest)`` in train mode; the ``rest`` it leaves behind
is carried to the next step. Loss = mean masked CE + z-loss + the model's ``aux["aux_loss"]``. With
``grad_accum = A`` the batch is split into A micro-batches scanned in order; gradients are summed with the
token-count normalisation of the full batch, so A micro-batches equal one big batch up to float rounding.

Sharded (``mesh`` given): MaxText style, ``jax.jit`` with explicit in/out shardings: every state leaf is placed
by its logical axes through the rules table (optimizer moments inherit their parameter's axes; scalars and RNG
keys are replicated), the batch is split over the data-parallel axes, metrics are replicated; tracing happens
under ``jax.set_mesh`` so the model's logical activation constraints apply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from attnlab.parallel.sharding import DEFAULT_RULES, batch_sharding, replicated, state_shardings
from attnlab.state.forward import forward, token_losses
from attnlab.state.optimizer import OptimizerConfig, make_optimizer


def _micro_loss(params, rest, batch, *, graphdef, z_loss, num_tokens, num_micro):
  logits, aux, new_rest = forward(graphdef, params, rest, batch)
  ce, z = token_losses(logits, batch["targets"], z_loss)
  mask = batch["loss_mask"]
  ce_sum, z_sum = jnp.sum(ce * mask), jnp.sum(z * mask)
  aux_loss = aux["aux_loss"].astype(jnp.float32)
  loss = (ce_sum + z_sum) / num_tokens + aux_loss / num_micro
  return loss, (new_rest, {"ce_sum": ce_sum, "z_sum": z_sum, "aux_loss": aux_loss / num_micro})


class ShardedStep:
  """``step(state, batch)`` jitted with the shardings the rules give ``state`` (built at the first call, from the
  state's structure and its Variables' ``logical_axes``)."""

  def __init__(self, step, mesh, rules):
    self._step, self.mesh, self.rules = step, mesh, rules
    self._jitted = None

  def shardings(self, state):
    """(state shardings, batch sharding) of ``state`` (concrete or abstract) on this step's mesh."""
    return state_shardings(state, self.mesh, self.rules), batch_sharding(self.mesh, self.rules)

  def jitted(self, state):
    if self._jitted is None:
      state_sh, batch_sh = self.shardings(state)
      self._jitted = jax.jit(self._step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, replicated(self.mesh)),
                             donate_argnums=0)
    return self._jitted

  def __call__(self, state, batch):
    with jax.set_mesh(self.mesh):  # traced under the mesh: the model's logical constraints apply
      return self.jitted(state)(state, batch)


def all_finite(tree) -> jax.Array:
  """1.0 when every floating-point leaf of ``tree`` is finite, else 0.0 (one fused reduction per leaf, computed
  inside the step so that a state is known finite before it is ever saved)."""
  oks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
         if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(oks)).astype(jnp.float32) if oks else jnp.ones((), jnp.float32)


@functools.lru_cache(maxsize=16)
def train_step_fn(graphdef, opt_cfg: OptimizerConfig, total_steps: int, z_loss: float, grad_accum: int,
                  mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES):
  """The jitted ``step(state, batch) -> (state, metrics)``, sharded over ``mesh`` when given (a
  :class:`ShardedStep`); cached so equal configs share one compilation."""
  tx, schedule = make_optimizer(opt_cfg, total_steps)

  def step(state, batch):
    params, rest = state["params"], state["rest"]
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    grad_fn = jax.value_and_grad(
        functools.partial(_micro_loss, graphdef=graphdef, z_loss=z_loss, num_tokens=num_tokens,
                          num_micro=grad_accum), has_aux=True)
    if grad_accum == 1:
      (loss, (rest, parts)), grads = grad_fn(params, rest, batch)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)

      def body(carry, mb):
        rest, g_acc, l_acc, p_acc = carry
        (l, (rest, p)), g = grad_fn(params, rest, mb)
        return (rest, jax.tree.map(jnp.add, g_acc, g), l_acc + l, jax.tree.map(jnp.add, p_acc, p)), None

      zeros = {"ce_sum": 0.0, "z_sum": 0.0, "aux_loss": 0.0}
      zeros = jax.tree.map(lambda x: jnp.zeros((), jnp.float32), zeros)
      init = (rest, jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), zeros)
      (rest, grads, loss, parts), _ = jax.lax.scan(body, init, micro)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {"finite": all_finite((params, opt_state)),  # the updated state, checked before it can be saved
               "loss": loss, "ce": parts["ce_sum"] / num_tokens, "z_loss": parts["z_sum"] / num_tokens,
               "aux_loss": parts["aux_loss"], "grad_norm": grad_norm, "lr": schedule(state["step"]),
               "tokens": num_tokens}
    return {"params": params, "rest": rest, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  return ShardedStep(step, mesh, rules)

