"""Flax NNX: lean steps through nnx.Optimizer equal nnx.value_and_grad's,
compute-lean takes over nnx.Linear, and misuse gets clear errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import blockllm_jax as bl
from blockllm_jax import _layout

WIDTH, DEPTH = 32, 4


class MLP(nnx.Module):
  """Input layer, DEPTH hidden layers (nnx.List: paths layers/<i>/...), head."""

  def __init__(self, rngs, einsum=False, width=WIDTH):
    self.inp = nnx.Linear(8, width, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(width, width, rngs=rngs) for _ in range(DEPTH)])
    self.out = (nnx.Einsum("bi,io->bo", (width, 4), rngs=rngs) if einsum
                else nnx.Linear(width, 4, rngs=rngs))

  def __call__(self, x):
    x = jax.nn.gelu(self.inp(x))
    for layer in self.layers:
      x = x + jax.nn.gelu(layer(x))
    return self.out(x)


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def batch(t):
  kx, ky = jax.random.split(jax.random.PRNGKey(t))
  return jax.random.normal(kx, (16, 8)), jax.random.normal(ky, (16, 4))


OPTIMIZERS = {
    # patience 2 on noisy minibatch losses: several reselections in 12 steps.
    "blockllm": lambda: bl.blockllm(3e-3, sparsity=0.7, patience=2),
    "badam": lambda: bl.badam(3e-3, switch_every=2),
    "bread": lambda: bl.bread(3e-3, switch_every=2, correction="sgd"),
}


def train(name, lean, steps=12, model_fn=MLP):
  model = model_fn(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, OPTIMIZERS[name](), wrt=nnx.Param)
  grad_fn = bl.lean_value_and_grad(loss_fn)
  traces = []

  @nnx.jit
  def train_step(model, optimizer, x, y):
    traces.append(1)
    if lean:
      loss, grads = grad_fn(model, optimizer, x, y)
    else:
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value=loss)
    return loss

  losses = [float(train_step(model, optimizer, *batch(t))) for t in range(steps)]
  return model, optimizer, losses, len(traces)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lean_through_nnx_optimizer_equals_value_and_grad(name):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # every nnx.Linear is taken over: no warning
    lean_model, lean_opt, lean_losses, traces = train(name, lean=True)
  plain_model, plain_opt, plain_losses, _ = train(name, lean=False)
  assert traces == 1  # compiled once
  np.testing.assert_allclose(lean_losses, plain_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(lean_model, nnx.Param)),
                  jax.tree.leaves(nnx.state(plain_model, nnx.Param))):
    np.testing.assert_allclose(a, b, atol=1e-5)
  start = nnx.state(MLP(nnx.Rngs(0)), nnx.Param)
  moved = [float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(
      jax.tree.leaves(start), jax.tree.leaves(nnx.state(lean_model, nnx.Param)))]
  assert any(moved) and not all(moved) or name == "bread"  # a block at a time
  state = nnx.as_pure(lean_opt.opt_state)
  assert int(bl.reselection_count(state)) >= 3
  assert int(bl.reselection_count(state)) == int(
      bl.reselection_count(nnx.as_pure(plain_opt.opt_state)))


def _step_memory(lean):
  model = MLP(nnx.Rngs(0), width=256)
  optimizer = nnx.Optimizer(model, bl.blockllm(1e-3, sparsity=0.8), wrt=nnx.Param)
  grad_fn = bl.lean_value_and_grad(loss_fn, compute_lean=lean == "compute")
  graphdef, state = nnx.split((model, optimizer))

  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    if lean:
      loss, grads = grad_fn(model, optimizer, x, y)
    else:
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, value=loss)
    return nnx.state((model, optimizer)), loss

  return bl.compiled_memory(step, state, jnp.zeros((1, 8)), jnp.zeros((1, 4))).temp


def test_compute_lean_takes_over_nnx_linear():
  """Every nnx.Linear kernel is taken over; the lean step's temporaries at
  batch 1 (width 256: weights dominate) are well below the plain step's,
  which holds every weight gradient."""
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, bl.blockllm(1e-3), wrt=nnx.Param)
  _, grads = bl.lean_value_and_grad(loss_fn)(model, optimizer, *batch(0))
  lean = jax.tree.leaves(nnx.as_pure(grads))[0].lean
  paths = [_layout.path_to_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.as_pure(nnx.state(model, nnx.Param)))[0]]
  taken = {paths[i] for i in lean.compute_lean}
  assert taken == {p for p in paths if p.endswith("kernel")} and len(taken) == DEPTH + 2
  plain, compute_lean = _step_memory(None), _step_memory("compute")
  assert compute_lean < 0.8 * plain, (compute_lean, plain)


def test_compute_lean_warns_for_layers_it_cannot_take_over():
  with pytest.warns(UserWarning, match=r"nnx\.Einsum\(32, 4\)"):
    train("blockllm", lean=True, steps=2, model_fn=lambda r: MLP(r, einsum=True))


def test_nnx_misuse_gets_clear_errors():
  model = MLP(nnx.Rngs(0))
  grad_fn = bl.lean_value_and_grad(loss_fn)
  adam = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  with pytest.raises(ValueError, match="`optimizer`.*blockllm, badam or bread"):
    grad_fn(model, adam, *batch(0))
  ours = nnx.Optimizer(model, bl.blockllm(1e-3), wrt=nnx.Param)
  with pytest.raises(TypeError, match="`model` must be the nnx Module"):
    grad_fn(nnx.state(model, nnx.Param), ours, *batch(0))
  with pytest.raises(TypeError, match="`optimizer` must be an nnx.Optimizer"):
    grad_fn(model, nnx.as_pure(ours.opt_state), *batch(0))
  # Stand-ins are not gradients: any other transformation fails on them.
  _, grads = grad_fn(model, ours, *batch(0))
  with pytest.raises(TypeError):
    optax.adam(1e-3).update(nnx.as_pure(grads), adam.tx.init(
        nnx.as_pure(nnx.state(model, nnx.Param))))


def test_nnx_example_runs_and_lean_matches_plain():
  from tests.test_finetune_demo import load_example
  rows = load_example("nnx_train").main(
      ["--steps", "4", "--width", "32", "--depth", "2", "--seq-len", "16",
       "--batch-size", "4", "--no-progress"])
  by = {row[0]: row for row in rows}
  assert set(by) == {"adamw", "blockllm", "blockllm-lean"}
  assert by["blockllm"][1] == by["blockllm-lean"][1]  # same loss, 4 decimals


class Dropped(nnx.Module):
  """A model with state besides its parameters: a dropout RNG stream and a
  call counter, both advanced by every call."""

  def __init__(self, rngs):
    self.body = MLP(rngs)
    self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))
    self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls[...] += 1
    return self.body(self.dropout(x))


def test_lean_writes_back_model_state_like_value_and_grad():
  """Dropout draws a new mask every step on both paths, and the steps stay
  equal: the state the loss changes reaches the user's model."""
  results = []
  for lean in (True, False):
    model = Dropped(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, OPTIMIZERS["blockllm"](), wrt=nnx.Param)
    grad_fn = bl.lean_value_and_grad(loss_fn) if lean else nnx.value_and_grad(loss_fn)

    @nnx.jit
    def train_step(model, optimizer, x, y):
      if lean:
        loss, grads = grad_fn(model, optimizer, x, y)
      else:
        loss, grads = grad_fn(model, x, y)
      optimizer.update(model, grads, value=loss)
      return loss

    x, y = batch(0)  # the same batch: only the dropout mask changes
    results.append(([float(train_step(model, optimizer, x, y)) for _ in range(4)],
                    int(model.calls[...])))
  (lean_losses, lean_calls), (plain_losses, plain_calls) = results
  assert lean_calls == plain_calls == 4
  np.testing.assert_allclose(lean_losses, plain_losses, rtol=1e-5)
  assert len(set(np.round(lean_losses, 6))) == 4
