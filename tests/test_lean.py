"""Lean steps: same results as the plain path, less memory, one compilation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl
from blockllm_jax import _engine
from blockllm_jax import _layout
from blockllm_jax import _lean
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import add_lora
from blockllm_jax.models import causal_lm_loss

TINY_LLAMA = LlamaSettings(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2)
MODEL = LlamaForCausalLM(TINY_LLAMA)


def batch_at(step, batch=4, seq=12):
  return jax.random.randint(jax.random.PRNGKey(100 + step), (batch, seq), 0,
                            TINY_LLAMA.vocab_size)


def loss_of(model):
  def loss_fn(params, tokens):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens)
  return loss_fn


def llama_params(model=MODEL, seed=0):
  return model.init(jax.random.PRNGKey(seed), batch_at(0))["params"]


def plain_step(tx, loss_fn):
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss
  return step


def lean_step(tx, loss_fn, compute_lean=True, remat_policy="auto"):
  grad_fn = bl.lean_value_and_grad(loss_fn, compute_lean=compute_lean,
                                   remat_policy=remat_policy)

  def step(params, state, tokens):
    loss, grads = grad_fn(params, state, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss
  return step


def run(step, tx, params, steps):
  step = jax.jit(step)
  state = tx.init(params)
  losses = []
  for t in range(steps):
    params, state, loss = step(params, state, batch_at(t))
    losses.append(float(loss))
  return params, state, losses


# eps=1e-6: with the default 1e-8, Adam maps a coordinate whose gradient is
# ~1e-9 to a direction of about +-1 and so amplifies float reassociation
# noise; a larger eps keeps the comparison about the algorithm.
OPTIMIZERS = {
    # patience 2: several reselections in 10 steps.
    "blockllm": lambda: bl.blockllm(3e-3, sparsity=0.8, patience=2,
                                    stall_tolerance=0.0, eps=1e-6),
    # (Top-k within leaves is left out: a float-level tie flips a kept
    # coordinate, so the two paths may legitimately differ there.)
    "blockllm_wd": lambda: bl.blockllm(3e-3, sparsity=0.7, patience=2,
                                       weight_decay=0.1, eps=1e-6),
    "badam": lambda: bl.badam(3e-3, switch_every=3, order="random", eps=1e-6),

    "bread_sgd": lambda: bl.bread(3e-3, correction="sgd", switch_every=3,
                                  correction_scale=2.0, scope="partial",
                                  eps=1e-6),
}


NO_BATCH_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


@pytest.mark.parametrize("name, compute_lean, remat_policy", [
    *[(name, compute_lean, "auto") for name in sorted(OPTIMIZERS)
      for compute_lean in (False, True)],
    # The backward loop recomputing the forward from the saved products.
    ("blockllm", True, NO_BATCH_DOTS),
])
def test_lean_path_matches_plain_path(name, compute_lean, remat_policy):
  tx = OPTIMIZERS[name]()
  loss_fn = loss_of(MODEL)
  params = llama_params()
  want_params, want_state, want_losses = run(plain_step(tx, loss_fn), tx,
                                             params, 10)
  got_params, got_state, got_losses = run(
      lean_step(tx, loss_fn, compute_lean, remat_policy), tx, params, 10)
  assert int(bl.reselection_count(got_state)) >= 3  # several (re)selections
  assert int(bl.reselection_count(got_state)) == int(
      bl.reselection_count(want_state))
  assert jax.tree.map(bool, bl.selected(got_state, params)) == jax.tree.map(
      bool, bl.selected(want_state, params))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(got_params),
                       jax.tree.leaves(want_params)):
    # Float reassociation (Adam on the packed buffer vs per leaf), which
    # Adam's normalisation amplifies where v is tiny: a few coordinates of
    # ~2000 differ by up to ~5e-6 (seen with the BAdam and weight-decay
    # cases on the 2-core CI machine).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  moved = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(got_params), jax.tree.leaves(params)))
  assert moved > 0


def test_bread_lora_lean_matches_plain():
  settings, params = add_lora(TINY_LLAMA, llama_params(), 2,
                              jax.random.PRNGKey(1))
  params = jax.tree.map(  # non-zero lora_b, so that lora_a moves too
      lambda p: p + 0.01 if p.ndim == 2 and p.shape[0] == 2 else p, params)
  tx = bl.bread(3e-3, correction="lora", switch_every=3, eps=1e-6)
  loss_fn = loss_of(LlamaForCausalLM(settings))
  want, _, _ = run(plain_step(tx, loss_fn), tx, params, 7)
  got, _, _ = run(lean_step(tx, loss_fn), tx, params, 7)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compute_lean", [False, True])
def test_backward_packs_norms_and_dense_gradients(compute_lean):
  params = llama_params()
  loss_fn = loss_of(MODEL)
  tokens = batch_at(0)
  tx = bl.blockllm(1e-3, sparsity=0.0)  # room for any choice of leaves
  state = tx.init(params)
  want = jax.grad(loss_fn)(params, tokens)
  layout = _layout.build_layout(params)
  flat_want = layout.eligible_leaves(want)
  rng = np.random.default_rng(0)
  chosen = rng.random(layout.num_eligible) < 0.4
  sizes = np.asarray(layout.sizes)
  offset = np.cumsum(np.where(chosen, sizes, 0)) - np.where(chosen, sizes, 0)
  asked_norms = rng.random(layout.num_eligible) < 0.5
  dense = [i % 3 == 0 for i in range(layout.num_eligible)]

  @jax.jit
  def lean(params, state, tokens):
    loss, grads = bl.lean_value_and_grad(
        loss_fn, compute_lean=compute_lean)(params, state, tokens)
    result = grads.backward(layout.eligible_index, packed=jnp.asarray(chosen),
                            offset=jnp.asarray(offset, jnp.int32),
                            norms=jnp.asarray(asked_norms), dense=dense)
    return loss, result

  loss, result = lean(params, state, tokens)
  np.testing.assert_allclose(loss, loss_fn(params, tokens), rtol=1e-6)
  capacity = state[0].mu.shape[0]
  packed = np.zeros(capacity, np.float32)
  for i in np.flatnonzero(chosen):
    packed[offset[i]:offset[i] + sizes[i]] = np.ravel(flat_want[i])
  np.testing.assert_allclose(result.packed, packed, rtol=1e-5, atol=1e-7)
  norm_sq = [float(jnp.sum(g**2)) if asked else 0.0
             for g, asked in zip(flat_want, asked_norms)]
  np.testing.assert_allclose(result.norm_sq, norm_sq, rtol=1e-5, atol=1e-9)
  for got, g, is_dense in zip(result.dense, flat_want, dense):
    if is_dense:
      np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-7)
    else:
      assert got is None


def test_offsets_travel_exactly_as_normal_floats():
  """A control token's offset is the bits of a normal float: exact through
  the split of the control rows (a float sum with zeros) and never a
  denormal that a flush to zero could change."""
  offsets = np.array([0, 1, 2**23, 2**24 + 1, 2**30 + 12345,
                      _lean._MAX_CAPACITY - 1], np.int32)
  encoded = np.asarray(_lean._encode_offset(jnp.asarray(offsets)))
  assert np.all(np.isfinite(encoded))
  assert np.all(encoded >= np.finfo(np.float32).tiny)
  modes = np.arange(len(offsets), dtype=np.float32) % 4
  rows = jax.jit(lambda m: _engine.split_matrix(m, as_bits=False))(
      jnp.stack([jnp.asarray(modes), jnp.asarray(encoded)], axis=1))
  for row, mode, offset in zip(rows, modes, offsets):
    control = _lean._decode_control(row)
    assert int(control.offset) == int(offset)
    assert float(control.mode) == mode


def test_lean_step_refuses_buffers_its_offsets_cannot_address():
  # Abstract shapes: nothing of this size is allocated.
  size = _lean._MAX_CAPACITY + 1
  params = {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}
  tx = bl.badam(1e-3, switch_every=2, blocks=lambda path, leaf: 0)
  state = jax.eval_shape(tx.init, params)
  step = lean_step(tx, lambda p, x: jnp.sum(p["w"]) * x, compute_lean=False)
  with pytest.raises(ValueError, match=f"at most {_lean._MAX_CAPACITY}"):
    jax.eval_shape(step, params, state, jnp.float32(1))


def test_compute_lean_takes_over_every_llama_projection():
  params = llama_params()
  tx = bl.blockllm(1e-3)
  state = tx.init(params)
  seen = {}

  def probe(params, state, tokens):
    _, grads = bl.lean_value_and_grad(loss_of(MODEL))(params, state, tokens)
    seen["lean"] = grads.compute_lean
    return 0.0

  jax.eval_shape(probe, params, state, batch_at(0))
  paths = [_layout.path_to_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  lean_paths = {paths[i] for i in seen["lean"]}
  kernels = {p for p in paths if p.endswith("kernel")}
  assert lean_paths == kernels  # 7 projections per layer plus lm_head


class Awkward(nn.Module):
  """Dense layers the interceptor must not take over, and one it may."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(8, name="shared")
    x = shared(shared(x))  # one kernel, two calls
    x = nn.remat(nn.Dense)(8, name="remat")(x)
    plain = nn.Dense(8, name="plain")
    x = plain(x)
    # The same kernel read again outside its Dense call.
    x = x + jnp.sum(plain.variables["params"]["kernel"]) * 1e-2
    return nn.Dense(4, use_bias=False, name="clean")(jnp.tanh(x))


def test_fallback_warns_and_stays_exact():
  model = Awkward()
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
  y = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
  params = model.init(jax.random.PRNGKey(2), x)["params"]
  loss_fn = lambda p, x: jnp.mean((model.apply({"params": p}, x) - y)**2)
  tx = bl.blockllm(1e-2, sparsity=0.5, patience=2, eligible=lambda p, l: True)
  grad_fn = bl.lean_value_and_grad(loss_fn)

  def lean(params, state, x):
    loss, grads = grad_fn(params, state, x)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  with pytest.warns(UserWarning) as record:
    jax.jit(lean).lower(params, state, x)
  message = str(record[0].message)
  assert "shared/kernel: used by 2 Dense calls" in message
  assert "plain/kernel: also used outside its Dense call" in message
  # A Dense alone in its nn.remat is taken over there (_lean_remat).
  assert "remat" not in message
  assert "clean" not in message
  lean_step_fn = jax.jit(lean)
  plain = jax.jit(plain_step(tx, loss_fn))
  want_params, want_state = params, tx.init(params)
  got_params, got_state = params, tx.init(params)
  for _ in range(6):
    want_params, want_state, _ = plain(want_params, want_state, x)
    got_params, got_state = lean_step_fn(got_params, got_state, x)
  for g, w in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


class TwoDense(nn.Module):

  @nn.compact
  def __call__(self, x, skip_second=False):
    x = nn.Dense(8, name="first")(x)
    return x if skip_second else nn.Dense(8, name="second")(x)


def test_loss_that_traces_differently_is_refused_by_name():
  model = TwoDense()
  x = jnp.ones((2, 8))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  traces = []

  def loss_fn(p, x):
    # Python-side state: the second trace skips a layer the plan found.
    traces.append(None)
    return jnp.sum(model.apply({"params": p}, x,
                               skip_second=len(traces) > 1) ** 2)

  tx = bl.blockllm(1e-2, sparsity=0.5, eligible=lambda p, l: True)
  with pytest.raises(RuntimeError, match="second/kernel") as error:
    jax.eval_shape(lambda p, s: bl.lean_value_and_grad(loss_fn)(p, s, x),
                   params, tx.init(params))
  assert "compute_lean=False" in str(error.value)


def test_lean_step_compiles_once_across_reselections():
  tx = OPTIMIZERS["blockllm"]()
  traces = []
  inner = lean_step(tx, loss_of(MODEL))

  def step(params, state, tokens):
    traces.append(1)
    return inner(params, state, tokens)

  _, state, _ = run(step, tx, llama_params(), 12)
  assert int(bl.reselection_count(state)) >= 3
  assert len(traces) == 1


def test_non_finite_loss_skips_the_step():
  tx = OPTIMIZERS["blockllm"]()
  params = llama_params()
  grad_fn = bl.lean_value_and_grad(lambda p, t: loss_of(MODEL)(p, t) * jnp.nan)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = grad_fn(params, state, batch_at(0))
    return tx.update(grads, state, params, value=loss)

  updates, new_state = step(params, state)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
  assert int(new_state[0].skipped_count) == 1
  assert int(new_state[0].selection_count) == 0


def test_lean_gradients_are_refused_by_other_transformations():
  params = llama_params()
  state = bl.blockllm(1e-3).init(params)

  def step(params, state):
    _, grads = bl.lean_value_and_grad(loss_of(MODEL))(params, state,
                                                       batch_at(0))
    return optax.adam(1e-3).update(grads, optax.adam(1e-3).init(params))

  with pytest.raises(Exception):
    jax.eval_shape(step, params, state)


def _memory(step, tx, params, tokens):
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, tx.init(params), tokens).compile()
  return bl.CompiledMemory.of(compiled)


def _weights_dominated_llama(remat=False, scan_layers=False):
  """(tokens, params, loss_fn) of a LLaMA whose activations are tiny next
  to its weights (1 x 8 tokens), so gradients dominate the temporaries."""
  settings = LlamaSettings(vocab_size=64, hidden_size=128,
                           intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2,
                           remat=remat, scan_layers=scan_layers)
  model = LlamaForCausalLM(settings)
  tokens = jnp.zeros((1, 8), jnp.int32)
  return tokens, model.init(jax.random.PRNGKey(0), tokens)["params"], loss_of(model)


def test_lean_step_never_holds_the_full_gradient():
  # Activations are tiny next to the weights here, so the gradient tree
  # dominates the plain step's temporaries.
  tokens, params, loss_fn = _weights_dominated_llama()
  tx = bl.blockllm(1e-3, sparsity=0.9)
  layout = _layout.build_layout(params)
  leaf_bytes = 4 * max(layout.sizes)  # one projection's gradient
  gradient_bytes = 4 * sum(layout.sizes)
  capacity_bytes = 4 * tx.init(params)[0].mu.shape[0]
  plain = _memory(plain_step(tx, loss_fn), tx, params, tokens)
  for compute_lean in (False, True):
    lean = _memory(lean_step(tx, loss_fn, compute_lean), tx, params, tokens)
    # The packed gradient plus a few leaves' gradients, never all of them.
    assert lean.temp <= capacity_bytes + 4 * leaf_bytes + 2**20, (
        lean, plain, leaf_bytes)
    if compute_lean:
      # Skipped layers allocate nothing and the moments are updated in the
      # backward pass: one weight gradient being written and the (tiny)
      # activations, no packed gradient.
      assert lean.temp <= 2 * leaf_bytes + 2**18, (lean, leaf_bytes)
    assert plain.temp >= gradient_bytes  # what the lean path avoids
    assert lean.total < plain.total - gradient_bytes // 2


def _static_freeze_step(loss_fn, params, trained):
  """AdamW on the leaves ``trained(path)`` picks, the others under
  ``stop_gradient``: the floor a lean step can approach (XLA drops the
  frozen gradients)."""
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: trained(_layout.path_to_str(path)), params)
  tx = optax.masked(optax.adamw(1e-3), mask)

  def frozen_loss(params, tokens):
    params = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p),
                          mask, params)
    return loss_fn(params, tokens)
  return tx, plain_step(tx, frozen_loss)


def test_lean_step_is_at_the_static_freeze_floor():
  """The moments are updated in the backward pass: a lean step holds no
  packed gradient, so it needs no more than AdamW on a fixed set of leaves
  of the same size (BlockLLM) or on one block (BAdam), within 3% (float32
  XLA:CPU analysis, weights dominating at 1 x 8 tokens)."""
  tokens, params, loss_fn = _weights_dominated_llama()
  # BlockLLM's budget at s=0.75 is a quarter of the 590,976 eligible
  # coordinates: one decoder layer's 147,712 and 32 more.
  blockllm = bl.blockllm(1e-3, sparsity=0.75)
  capacity = blockllm.init(params)[0].mu.shape[0]
  assert capacity == 147_744
  static_tx, static = _static_freeze_step(
      loss_fn, params, lambda p: p.startswith("model/layers_0/"))
  floor = _memory(static, static_tx, params, tokens)
  lean = _memory(lean_step(blockllm, loss_fn), blockllm, params, tokens)
  packed = _memory(lean_step(blockllm, loss_fn, compute_lean=False), blockllm,
                   params, tokens)
  assert lean.total <= 1.03 * floor.total, (lean, floor)
  # Tier B alone still packs the gradient: one moment buffer more.
  assert packed.temp >= lean.temp + 4 * capacity * 0.9

  badam = bl.badam(1e-3)
  block = dict(bl.block_partition(params))[0]  # BAdam's first block
  static_tx, static = _static_freeze_step(loss_fn, params, lambda p: p in block)
  floor = _memory(static, static_tx, params, tokens)
  lean = _memory(lean_step(badam, loss_fn), badam, params, tokens)
  assert lean.total <= 1.03 * floor.total, (lean, floor)


@pytest.mark.parametrize("name", ["blockllm", "badam"])
def test_fused_step_with_a_finite_loss_and_a_non_finite_gradient(name):
  """A fused lean step cannot take back what it folded into the moments:
  a gradient that is not finite leaves its leaf's moments as they were and
  skips the step (parameters, counts, selection), all moments stay finite."""
  params = llama_params()
  tx = (bl.blockllm(1e-3, sparsity=0.0, patience=100, eligible=lambda p, x: True)
        if name == "blockllm" else
        bl.badam(1e-3, blocks=lambda path, leaf: 0, switch_every=100))

  def loss_fn(params, tokens, poison):
    # Forward 0, gradient 0 * inf = NaN for the final norm's scale.
    bad = jnp.sum(jnp.sqrt(jnp.abs(params["model"]["norm"]["weight"]) * poison))
    return loss_of(MODEL)(params, tokens) + bad

  grad_fn = bl.lean_value_and_grad(loss_fn)

  @jax.jit
  def step(params, state, poison):
    loss, grads = grad_fn(params, state, batch_at(0), poison)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  params, state, _ = step(params, tx.init(params), jnp.float32(1.0))
  new_params, new_state, loss = step(params, state, jnp.float32(0.0))
  assert np.isfinite(float(loss))
  for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  inner, new_inner = state[0], new_state[0]
  assert int(new_inner.skipped_count) == int(inner.skipped_count) + 1
  assert int(new_inner.count) == int(inner.count)
  assert bool(jnp.all(jnp.isfinite(new_inner.mu)))
  assert bool(jnp.all(jnp.isfinite(new_inner.nu)))
  # The norm's window (the last leaf in flattening order, with every leaf
  # selected) kept its moments.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  sizes = [x.size for _, x in flat]
  where = [i for i, (p, _) in enumerate(flat)
           if _layout.path_to_str(p) == "model/norm/weight"][0]
  if name == "blockllm":
    offset = int(inner.offset[where])
  else:
    offset = sum(sizes[:where])
  window = slice(offset, offset + 32)
  np.testing.assert_array_equal(new_inner.nu[window], inner.nu[window])


@pytest.mark.parametrize("name", ["blockllm", "badam"])
def test_bfloat16_moments_round_with_the_same_bits_on_both_paths(name):
  """One step from the same state: the fused lean step rounds its bfloat16
  moments stochastically with the plain step's bits (position and step
  count), so they agree but where the float32 moments themselves differ
  in their last bits (one coordinate in thousands, by one bfloat16 ulp)."""
  tx = (bl.blockllm(3e-3, sparsity=0.5, patience=2, moment_dtype=jnp.bfloat16)
        if name == "blockllm" else
        bl.badam(3e-3, switch_every=3, moment_dtype=jnp.bfloat16))
  loss_fn = loss_of(MODEL)
  params, state, _ = run(plain_step(tx, loss_fn), tx, llama_params(), 4)
  plain = jax.jit(plain_step(tx, loss_fn))(params, state, batch_at(4))[1][0]
  lean = jax.jit(lean_step(tx, loss_fn))(params, state, batch_at(4))[1][0]
  for field in ("mu", "nu"):
    a = np.asarray(getattr(plain, field).astype(jnp.float32))
    b = np.asarray(getattr(lean, field).astype(jnp.float32))
    differ = a != b
    assert differ.sum() <= max(2, a.size // 1000), (field, differ.sum())
    np.testing.assert_allclose(b, a, rtol=2**-7, atol=1e-9)


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def _jit_calls(jaxpr, name):
  """The jaxprs of every nested ``jax.jit`` call named ``name``."""
  return [eqn.params["jaxpr"] for eqn in _equations(jaxpr)
          if eqn.params.get("name") == name]


def test_backward_rules_of_equal_layers_are_traced_once():
  # Each layer's seven projections reuse the traced rule of the same
  # projection in the other layers (one jaxpr per shape, not per layer):
  # what keeps tracing and lowering time near the plain step's.
  params = llama_params()
  tx = bl.blockllm(1e-3, sparsity=0.5)
  jaxpr = jax.make_jaxpr(lean_step(tx, loss_of(MODEL)))(
      params, tx.init(params), batch_at(0)).jaxpr
  calls = _jit_calls(jaxpr, "_dense_reduce")
  layers = TINY_LLAMA.num_hidden_layers
  # Every layer's projections (the head is not eligible by default).
  assert len(calls) == 7 * layers
  signatures = {tuple(str(v.aval) for v in c.jaxpr.invars) for c in calls}
  # q/o, k/v, gate/up and down: one traced rule per signature.
  assert len({id(c) for c in calls}) == len(signatures) == 4


@pytest.mark.parametrize("remat_policy, keeps_attention", [
    (None, True), ("auto", True), (NO_BATCH_DOTS, False)])
def test_remat_policy_sets_what_the_backward_loop_holds(remat_policy,
                                                        keeps_attention):
  # BlockLLM's lean step runs its backward passes in a `lax.while_loop`,
  # which holds every value the backward pass needs in the form `jax.vjp`
  # saved it: with no policy, each layer's softmax output
  # [batch, heads, seq, seq]. (On a GPU that cost 1.9 GB at gpu-350m; the
  # CPU compiler hoists it, so "auto" is no policy here.)
  params = llama_params()
  tx = bl.blockllm(1e-3, sparsity=0.5)
  tokens = batch_at(0)
  jaxpr = jax.make_jaxpr(lean_step(tx, loss_of(MODEL),
                                   remat_policy=remat_policy))(
      params, tx.init(params), tokens).jaxpr
  operands = [v.aval for eqn in _equations(jaxpr)
              if eqn.primitive.name == "while" for v in eqn.invars]
  assert operands
  batch, seq = tokens.shape
  attention = (batch, TINY_LLAMA.num_attention_heads, seq, seq)
  held = [a for a in operands if getattr(a, "shape", None) == attention]
  assert bool(held) == keeps_attention, held


def test_remat_policy_auto_and_bad_values():
  resolve = lambda policy, backend, transformed=False: (
      _lean._resolve_remat_policy(policy, transformed=transformed,
                                  backend=backend))
  assert resolve("auto", "cpu") is None
  assert resolve("auto", "gpu") is NO_BATCH_DOTS
  assert resolve("auto", "tpu") is NO_BATCH_DOTS
  # Layers under nn.remat / nn.scan keep their own checkpoints' choice.
  assert resolve("auto", "gpu", transformed=True) is None
  assert resolve(None, "gpu") is None
  assert resolve(NO_BATCH_DOTS, "cpu") is NO_BATCH_DOTS
  assert resolve(NO_BATCH_DOTS, "gpu", transformed=True) is NO_BATCH_DOTS
  with pytest.raises(ValueError, match="remat_policy must be 'auto', None"):
    bl.lean_value_and_grad(loss_of(MODEL), remat_policy="dots")
