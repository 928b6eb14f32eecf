"""Reference models of BAdam / BREAD for the tests: the block schedule in
NumPy, and the updates with one ``optax.scale_by_adam`` per leaf that is
re-initialised at every block switch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def path_str(path):
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat(tree):
  """``{'a/b': leaf}`` of a nested dict."""
  return {path_str(p): leaf for p, leaf in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def pass_order(order, num_blocks, seed, pass_index):
  """Block positions in the order pass ``pass_index`` visits them.

  The random order is specified as a fresh ``jax.random.permutation`` per
  pass, keyed by ``fold_in(PRNGKey(seed), pass_index)``.
  """
  if order == "ascending":
    return np.arange(num_blocks)
  if order == "descending":
    return np.arange(num_blocks)[::-1]
  key = jax.random.fold_in(jax.random.PRNGKey(seed), pass_index)
  return np.asarray(jax.random.permutation(key, num_blocks))


def schedule(steps, switch_every, num_blocks, order, seed=0):
  """The active block position at every step 0 .. steps-1."""
  active = []
  for t in range(steps):
    slot = t // switch_every
    active.append(int(pass_order(order, num_blocks, seed,
                                 slot // num_blocks)[slot % num_blocks]))
  return np.array(active)


class BlockAdamModel:
  """BAdam / BREAD step by step, leaf by leaf, with ``optax.scale_by_adam``.

  Args:
    block_of: ``{path: block position or None}`` for the ordinary leaves.
    always: paths trained at every step with persistent moments.
    adapters: ``{path: block position}`` of LoRA adapters (BREAD "lora").
    num_blocks, switch_every, order, seed: the schedule.
    learning_rate: callable of the finite step count.
    weight_decay: decoupled, on the Adam-trained leaves.
    correction: None, "sgd", "sign_sgd" or "lora"; scale, scope as BREAD.
  """

  def __init__(self, block_of, num_blocks, switch_every, order, seed=0, *,
               always=(), adapters=None, learning_rate=lambda t: 1e-2,
               weight_decay=0.0, correction=None, scale=1.0, scope="all"):
    self.block_of, self.always = dict(block_of), set(always)
    self.adapters = dict(adapters or {})
    self.num_blocks, self.switch_every = num_blocks, switch_every
    self.order, self.seed = order, seed
    self.learning_rate, self.weight_decay = learning_rate, weight_decay
    self.correction, self.scale, self.scope = correction, scale, scope
    self.adam = optax.scale_by_adam()
    self.states = {}
    self.t = 0

  def in_scope(self, position, active):
    return position != active if self.scope == "all" else position > active

  def step(self, grads, params):
    """Expected float32 updates ``{path: array}`` for one finite step."""
    t = self.t
    active = int(schedule(t + 1, self.switch_every, self.num_blocks,
                          self.order, self.seed)[t])
    if t % self.switch_every == 0:  # moments of the block period restart
      self.states = {p: s for p, s in self.states.items() if p in self.always}
    lr = self.learning_rate(t)
    updates = {}
    for path, grad in grads.items():
      grad = jnp.asarray(grad, jnp.float32)
      param = jnp.asarray(params[path], jnp.float32)
      block = self.block_of.get(path)
      adapter = self.adapters.get(path)
      if (path in self.always or block == active and adapter is None or
          (self.correction == "lora" and adapter is not None and
           self.in_scope(adapter, active))):
        if path not in self.states:
          self.states[path] = self.adam.init(param)
        direction, self.states[path] = self.adam.update(grad,
                                                        self.states[path])
        direction = direction + self.weight_decay * param
        if adapter is not None:
          direction = self.scale * direction
        updates[path] = -lr * direction
      elif (self.correction in ("sgd", "sign_sgd") and block is not None
            and self.in_scope(block, active)):
        direction = jnp.sign(grad) if self.correction == "sign_sgd" else grad
        updates[path] = -lr * self.scale * direction
      else:
        updates[path] = jnp.zeros_like(grad)
    self.t += 1
    return updates, active
