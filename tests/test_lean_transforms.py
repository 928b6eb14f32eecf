"""Lean steps inside ``nn.remat`` and ``nn.scan`` (``_lean_transforms``)."""

import dataclasses
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import blockllm_jax as bl
from blockllm_jax import _lean_transforms
from blockllm_jax.models import LlamaForCausalLM

from test_lean import OPTIMIZERS
from test_lean import TINY_LLAMA
from test_lean import _memory
from test_lean import _static_freeze_step
from test_lean import _weights_dominated_llama
from test_lean import batch_at
from test_lean import lean_step
from test_lean import loss_of
from test_lean import plain_step
from test_lean import run

REMAT_LLAMA = LlamaForCausalLM(dataclasses.replace(TINY_LLAMA, remat=True))


def _fallbacks(step, *args) -> list:
  """The compute-lean fallback warnings raised while tracing ``step``."""
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    jax.eval_shape(step, *args)
  return [str(r.message) for r in record if "fall back" in str(r.message)]


def _lean_matches_plain(model, tx, steps, compute_lean=True):
  """Trains ``model`` with ``tx`` on the lean and on the plain path: no
  fallback warning, one compilation, the same reselections, losses and
  parameters."""
  loss_fn = loss_of(model)
  params = model.init(jax.random.PRNGKey(0), batch_at(0))["params"]
  inner, traces = lean_step(tx, loss_fn, compute_lean), []

  def step(*args):
    traces.append(1)
    return inner(*args)

  assert _fallbacks(inner, params, tx.init(params), batch_at(0)) == []
  want, want_state, want_losses = run(plain_step(tx, loss_fn), tx, params,
                                      steps)
  got, got_state, got_losses = run(step, tx, params, steps)
  assert len(traces) == 1
  assert int(bl.reselection_count(got_state)) >= 3
  assert int(bl.reselection_count(got_state)) == int(
      bl.reselection_count(want_state))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["blockllm", "bread_sgd"])
def test_remat_llama_lean_matches_plain_and_takes_every_layer(name):
  # Every projection is taken over in its checkpoint: nothing falls back.
  _lean_matches_plain(REMAT_LLAMA, OPTIMIZERS[name](), 10)


class CastLayer(nn.Module):
  """A bfloat16 layer on float32 parameters: the kernel is cast before its
  product, as in mixed-precision training."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(16, dtype=jnp.bfloat16, name="up")(x)
    return x + nn.Dense(8, dtype=jnp.bfloat16, name="down")(jax.nn.silu(h))


class CastModel(nn.Module):
  policy: str = "nothing_saveable"
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    policy = getattr(jax.checkpoint_policies, self.policy)
    layer = nn.remat(CastLayer, policy=policy) if self.remat else CastLayer
    for i in range(2):
      x = layer(name=f"layer_{i}")(x)
    shared = nn.Dense(8, name="head")
    return shared(x).astype(jnp.float32)


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_cast_kernels_and_the_remat_policy_are_kept(policy):
  model = CastModel(policy)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8))
  y = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  loss_fn = lambda p, x: jnp.mean((model.apply({"params": p}, x) - y)**2)
  # A loss that improves by less than 50% counts as stalled: reselections.
  tx = bl.blockllm(1e-2, sparsity=0.5, patience=1, stall_tolerance=0.5,
                   eligible=lambda p, l: True, eps=1e-6)
  step = lean_step(tx, loss_fn)
  state = tx.init(params)
  assert _fallbacks(step, params, state, x) == []
  # The rebuilt checkpoints keep the user's policy.
  jaxpr = jax.make_jaxpr(step)(params, state, x)
  policies = set()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "remat2":
        policies.add(eqn.params["policy"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  assert policies == {getattr(jax.checkpoint_policies, policy)}
  # Reference: the same layers unrolled without remat, whose Dense calls
  # the interceptor takes over (the same bfloat16 products); and the plain
  # step, to bfloat16 precision (its weight gradients are other products).
  unrolled = CastModel(policy, remat=False)
  unrolled_loss = lambda p, x: jnp.mean(
      (unrolled.apply({"params": p}, x) - y)**2)
  steps = [jax.jit(s) for s in (step, lean_step(tx, unrolled_loss),
                                plain_step(tx, loss_fn))]
  runs = [[params, state] for _ in steps]
  for _ in range(6):
    for fn, run_ in zip(steps, runs):
      run_[0], run_[1], _ = fn(*run_, x)
  (got, got_state), (want, _), (plain, _) = runs
  for g, w, p in zip(*map(jax.tree.leaves, (got, want, plain))):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g, p, rtol=2e-2, atol=1e-3)
  assert int(bl.reselection_count(got_state)) >= 2


class Reused(nn.Module):
  """A kernel used inside its checkpoint twice: not a Dense pattern."""

  @nn.compact
  def __call__(self, x):
    def twice(module, x):
      dense = nn.Dense(8, name="twice")
      return dense(dense(x))
    x = nn.remat(twice)(self, x)
    return nn.remat(nn.Dense)(8, name="once")(x)


def test_plan_reads_the_dense_pattern():
  def f(w, v, u, x):
    def layer(w, v, u, x):
      h = jnp.dot(x, w.astype(jnp.bfloat16))  # cast kernel: taken
      h = jnp.dot(h.astype(jnp.float32), v) + jnp.sum(v)  # v used twice
      return jnp.dot(u, h.T)  # u is the left operand: not a kernel
    return jax.checkpoint(layer)(w, v, u, x)
  w, v, u = jnp.ones((4, 4)), jnp.ones((4, 4)), jnp.ones((3, 4))
  x = jnp.ones((2, 4), jnp.bfloat16)
  jaxpr = jax.make_jaxpr(f)(w, v, u, x).jaxpr
  plans = _lean_transforms.plan(
      jaxpr, {var: i for i, var in enumerate(jaxpr.invars[:3])})
  assert plans == {0: _lean_transforms.Plan("remat", 0)}


def test_remat_lean_step_is_at_the_static_freeze_floor():
  """As without remat (tests/test_lean.py): no packed gradient, within 3%
  of AdamW on the same leaves, float32 XLA:CPU analysis."""
  tokens, params, loss_fn = _weights_dominated_llama(remat=True)
  blockllm = bl.blockllm(1e-3, sparsity=0.75)
  static_tx, static = _static_freeze_step(
      loss_fn, params, lambda p: p.startswith("model/layers_0/"))
  floor = _memory(static, static_tx, params, tokens)
  lean = _memory(lean_step(blockllm, loss_fn), blockllm, params, tokens)
  assert lean.total <= 1.03 * floor.total, (lean, floor)


SCANNED = {
    "scanned": LlamaForCausalLM(dataclasses.replace(TINY_LLAMA,
                                                    scan_layers=True)),
    "scanned+remat": LlamaForCausalLM(dataclasses.replace(
        TINY_LLAMA, scan_layers=True, remat=True)),
}


@pytest.mark.parametrize("layout,name,layer_axis,compute_lean", [
    ("scanned", "blockllm", 0, True),
    ("scanned+remat", "blockllm", 0, True),
    ("scanned+remat", "blockllm", None, True),
    ("scanned+remat", "badam", 0, True),
    ("scanned+remat", "blockllm", 0, False)])
def test_scanned_llama_lean_matches_plain(layout, name, layer_axis,
                                          compute_lean):
  """Each (leaf, layer) unit's gradient is taken inside the scan; with
  ``layer_axis=None`` a whole stack is one unit spread over its layers;
  tier B alone taps each layer's slice there."""
  base = {"blockllm": dict(learning_rate=3e-3, sparsity=0.8, patience=2,
                           stall_tolerance=0.0, eps=1e-6),
          "badam": dict(learning_rate=3e-3, switch_every=3, eps=1e-6)}[name]
  _lean_matches_plain(SCANNED[layout],
                      getattr(bl, name)(**base, layer_axis=layer_axis), 9,
                      compute_lean)


class Shared(nn.Module):
  """A layer whose weights every scan step shares (``variable_broadcast``):
  its kernel is not sliced per layer, so it is not taken over."""

  @nn.compact
  def __call__(self, x):
    body = nn.scan(lambda module, x, _: (nn.Dense(8, name="shared")(x), None),
                   variable_broadcast="params", split_rngs={"params": False},
                   length=3)
    x, _ = body(self, x, None)
    return nn.Dense(8, name="head")(x)


@pytest.mark.parametrize("module,named,taken", [
    (Reused, "twice", "once"),  # a kernel used twice in its checkpoint
    (Shared, "shared", "head"),  # weights a scan broadcasts, not slices
])
def test_a_layer_not_taken_over_is_named_in_a_warning(module, named, taken):
  model = module()
  x = jnp.ones((2, 8))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  loss_fn = lambda p, x: jnp.sum(model.apply({"params": p}, x)**2)
  tx = bl.blockllm(1e-2, eligible=lambda p, l: True)
  messages = _fallbacks(lean_step(tx, loss_fn), params, tx.init(params), x)
  assert len(messages) == 1
  assert f"{named}: inside a transformed function" in messages[0]
  assert taken not in messages[0]


def test_scanned_remat_lean_step_is_at_the_unrolled_floor():
  """A scanned + rematerialised LLaMA's lean step holds no stacked
  gradient: within 3% of AdamW on one layer of the same model unrolled (a
  static freeze cannot mask one layer of a stacked leaf), and far below
  the plain scanned step (float32 XLA:CPU analysis, weights dominating)."""
  tokens, params, loss_fn = _weights_dominated_llama()
  static_tx, static = _static_freeze_step(
      loss_fn, params, lambda p: p.startswith("model/layers_0/"))
  floor = _memory(static, static_tx, params, tokens)
  tokens, stacked, loss_fn = _weights_dominated_llama(remat=True,
                                                      scan_layers=True)
  blockllm = bl.blockllm(1e-3, sparsity=0.75, layer_axis=0)
  plain = _memory(plain_step(blockllm, loss_fn), blockllm, stacked, tokens)
  for tx in (blockllm, bl.badam(1e-3, layer_axis=0)):
    lean = _memory(lean_step(tx, loss_fn), tx, stacked, tokens)
    assert lean.total <= 1.03 * floor.total, (lean, floor)
    assert lean.temp < plain.temp / 3, (lean, plain)
