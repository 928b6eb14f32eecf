"""BlockLLM against optax.adam(w), hand computation and a NumPy selection model."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl
from tests import tiny_models
from tests.test_compact import numpy_greedy_fill

EVERYTHING = lambda path, leaf: True


def _run(tx, params, loss_fn, steps, values=None):
  """Trains for `steps`; `values[t]`, if given, replaces the loss fed to tx."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, value):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    value = jnp.where(jnp.isnan(value), loss, value)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  for t in range(steps):
    value = np.nan if values is None else values[t]
    params, state = step(params, state, jnp.float32(value))
  return params, state


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), rtol=0, atol=atol)


@pytest.mark.parametrize("losses", ["true", "rising", "random"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparsity_zero_equals_adamw(losses, weight_decay):
  params, loss_fn = tiny_models.mlp_problem()
  steps = 40
  rng = np.random.default_rng(0)
  values = {"true": None, "rising": np.arange(steps, dtype=np.float32),
            "random": rng.uniform(size=steps).astype(np.float32)}[losses]
  schedule = optax.linear_schedule(1e-2, 1e-3, steps)
  want, _ = _run(optax.adamw(schedule, weight_decay=weight_decay), params,
                 loss_fn, steps)
  got, state = _run(
      bl.blockllm(schedule, sparsity=0.0, weight_decay=weight_decay,
                  eligible=EVERYTHING, patience=2, min_interval=1),
      params, loss_fn, steps, values)
  _assert_trees_close(got, want, atol=1e-6)
  if losses == "rising":
    assert int(bl.reselection_count(state)) > 10


def _many_leaf_problem(seed, num_leaves=24):
  rng = np.random.default_rng(seed)
  params = {f"w{i:02d}": jnp.asarray(
      rng.normal(size=tuple(rng.integers(1, 7, rng.integers(1, 3)))),
      jnp.float32) for i in range(num_leaves)}
  return params, rng


@pytest.mark.parametrize("seed,sparsity", [(0, 0.5), (1, 0.8), (2, 0.95)])
def test_first_selection_matches_numpy_rule_and_others_get_exact_zero(seed, sparsity):
  params, rng = _many_leaf_problem(seed)
  tx = bl.scale_by_blockllm(sparsity, patience=3)
  update = jax.jit(tx.update)  # one compilation for the draws below
  sizes = np.array([p.size for p in jax.tree.leaves(params)])
  capacity = max(int(np.ceil(round((1 - sparsity) * sizes.sum(), 6))),
                 int(sizes.max()))
  for _ in range(4):  # gradient draws: each a different first selection
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape) * rng.uniform(0.1, 3),
                              p.dtype), params)
    updates, state = update(grads, tx.init(params), params, value=1.0)
    leaves = jax.tree.leaves(grads)
    norms = np.array([np.linalg.norm(np.asarray(g, np.float32))
                      for g in leaves], np.float32)
    want = numpy_greedy_fill(norms / 1.0, sizes, capacity)
    got = np.array(jax.tree.leaves(jax.tree.map(bool,
                                                bl.selected(state, params))))
    np.testing.assert_array_equal(got, want)
    assert state.mu.size == capacity
    for chosen, update_, grad in zip(want, jax.tree.leaves(updates), leaves):
      if chosen:  # First Adam step: mu_hat / sqrt(nu_hat) = g / (|g| + eps).
        # f32 rounding of (1 - b2) vs (1 - b2**1) allows ~1e-5 relative error.
        np.testing.assert_allclose(update_, grad / (jnp.abs(grad) + 1e-8),
                                   rtol=2e-5)
      else:
        assert np.all(np.asarray(update_) == 0)


def test_selection_sequence_matches_numpy_model_with_visit_counts():
  """Several reselections: the ||G|| / (1 + visits) rule in NumPy vs in-graph."""
  params, rng = _many_leaf_problem(7, num_leaves=16)
  sizes = np.array([p.size for p in jax.tree.leaves(params)])
  sparsity, patience = 0.75, 2
  tx = bl.scale_by_blockllm(sparsity, patience=patience, min_interval=patience)
  update = jax.jit(tx.update)
  state = tx.init(params)
  capacity = state.mu.size
  visits = np.zeros(len(sizes))
  history, since, model_selected = [], 0, None
  for t in range(30):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) *
                                               rng.uniform(0.1, 3), p.dtype), params)
    loss = np.float32(1.0 + 0.1 * np.sin(t))  # Oscillates: fires now and then.
    fire = model_selected is None or (
        len(history) >= patience and since >= patience and
        loss >= np.mean(np.asarray(history[-patience:], np.float32)) - 1e-3 *
        abs(np.mean(np.asarray(history[-patience:], np.float32))))
    if fire:
      norms = np.array([np.linalg.norm(np.asarray(g)) for g in jax.tree.leaves(grads)])
      model_selected = numpy_greedy_fill(
          (norms / (1 + visits)).astype(np.float32), sizes, capacity)
      visits += model_selected
      since = 0
    since += 1
    history.append(loss)
    _, state = update(grads, state, params, value=loss)
    got = np.array(jax.tree.leaves(jax.tree.map(bool, bl.selected(state, params))))
    np.testing.assert_array_equal(got, model_selected, err_msg=f"step {t}")
  np.testing.assert_array_equal(state.visit_count, visits)
  assert int(bl.reselection_count(state)) > 3


def test_visit_count_demotes_a_leaf_that_was_trained():
  params = {"a": jnp.zeros(10), "b": jnp.zeros(10)}
  grads = {"a": jnp.full(10, 1.5), "b": jnp.full(10, 1.0)}
  tx = bl.scale_by_blockllm(0.5, patience=1, min_interval=1,
                            eligible=EVERYTHING)
  state = tx.init(params)
  pick = lambda s: {k: bool(v) for k, v in bl.selected(s, params).items()}
  _, state = tx.update(grads, state, params, value=1.0)
  assert pick(state) == {"a": True, "b": False}  # 1.5 > 1.0
  _, state = tx.update(grads, state, params, value=2.0)  # Rising: reselect.
  assert pick(state) == {"a": False, "b": True}  # 1.5 / 2 < 1.0 / 1
  assert int(bl.reselection_count(state)) == 2


def test_rising_losses_reselect_and_falling_losses_never_do():
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.blockllm(1e-3, sparsity=0.8, patience=5, min_interval=5)
  steps = 60
  falling = 10.0 * 0.97 ** np.arange(steps)
  _, state = _run(tx, params, loss_fn, steps, falling.astype(np.float32))
  assert int(bl.reselection_count(state)) == 1
  rising = np.linspace(1.0, 2.0, steps).astype(np.float32)
  _, state = _run(tx, params, loss_fn, steps, rising)
  # Fires as soon as the window is full and min_interval elapsed: t = 5, 10, ...
  assert int(bl.reselection_count(state)) == 1 + (steps - 1) // 5


def test_plateau_moves_on_to_untrained_leaves():
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.blockllm(1e-3, sparsity=0.8, patience=4, min_interval=4,
                   stall_tolerance=1e-2)
  _, state = _run(tx, params, loss_fn, 40, np.full(40, 3.0, np.float32))
  assert int(bl.reselection_count(state)) == 1 + 39 // 4
  # With 0.2 of the coordinates per selection, several leaves got visited.
  assert int(np.sum(np.asarray(state[0].visit_count) > 0)) >= 4


def test_kept_leaves_keep_moments_and_new_leaves_restart():
  """Compare each leaf with optax.adam run on the steps it was selected."""
  params = {"a": jnp.zeros(6), "b": jnp.zeros(4), "c": jnp.zeros(5)}
  rng = np.random.default_rng(3)
  tx = bl.scale_by_blockllm(0.4, patience=1, min_interval=1, eligible=EVERYTHING)
  update = jax.jit(tx.update)
  state = tx.init(params)
  reference = {k: None for k in params}  # per-leaf optax.adam state
  adam = optax.scale_by_adam()
  previous = {k: False for k in params}
  for t in range(12):
    scale = {"a": 3.0, "b": 1.0, "c": 2.0}
    grads = {k: jnp.asarray(rng.normal(size=v.shape) * scale[k], jnp.float32)
             for k, v in params.items()}
    updates, state = update(grads, state, params, value=float(t % 3))
    now = {k: bool(v) for k, v in bl.selected(state, params).items()}
    for k in params:
      if now[k]:
        if not previous[k]:
          reference[k] = adam.init(params[k])
        want, reference[k] = adam.update(grads[k], reference[k])
        np.testing.assert_allclose(updates[k], want, rtol=1e-5, atol=1e-7)
      else:
        assert np.all(np.asarray(updates[k]) == 0)
    previous = now
  assert int(bl.reselection_count(state)) >= 4


def test_state_bytes_about_a_tenth_of_adam():
  params = tiny_models.transformer_params(jax.random.PRNGKey(0), width=64,
                                          layers=4)
  adam_bytes = bl.state_bytes(optax.adam(1e-3).init(params))
  tx = bl.blockllm(1e-3, sparsity=0.9, eligible=EVERYTHING)
  ratio = bl.state_bytes(tx.init(params)) / adam_bytes
  assert 0.1 <= ratio <= 0.103, ratio


def test_state_is_allocated_from_shapes_and_empty_trees():
  params = tiny_models.transformer_params(jax.random.PRNGKey(0))
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  tx = bl.blockllm(1e-3)
  concrete = tx.init(params)
  shapes = jax.eval_shape(tx.init, abstract)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
      lambda a: (a.shape, a.dtype), concrete)
  assert bl.state_bytes(tx.init(abstract)) == bl.state_bytes(concrete)
  empty_state = tx.init({})
  updates, _ = tx.update({}, empty_state, {}, value=1.0)
  assert updates == {}


def test_one_compilation_for_a_run_with_reselections():
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.blockllm(1e-2, sparsity=0.7, patience=3, min_interval=3)
  traces = []

  def step(params, state, value):
    traces.append(1)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params, value=value)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step)
  state = tx.init(params)
  for t in range(120):
    params, state = step(params, state, jnp.float32(t % 7))
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert int(bl.reselection_count(state)) >= 10


def _checkpoint_roundtrip(kind, state, tmp_path):
  if kind == "pickle":
    return pickle.loads(pickle.dumps(jax.device_get(state)))
  leaves, treedef = jax.tree.flatten(state)
  if kind == "npz":
    np.savez(tmp_path / "state.npz", *[np.asarray(x) for x in leaves])
    with np.load(tmp_path / "state.npz") as data:
      loaded = [jnp.asarray(data[f"arr_{i}"]) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, loaded)
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "orbax", state)
  checkpointer.wait_until_finished()
  return checkpointer.restore(tmp_path / "orbax", state)


@pytest.mark.parametrize("kind", ["pickle", "npz", "orbax"])
def test_resume_from_checkpoint_is_bit_identical(kind, tmp_path):
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.blockllm(1e-2, sparsity=0.6, patience=3, min_interval=3)
  values = (np.arange(60) % 5).astype(np.float32)  # several reselections
  step = jax.jit(tiny_models.train_step_fn(tx, loss_fn))

  def run(params, state, ts):
    for t in ts:
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = jax.jit(tx.update)(grads, state, params, value=values[t])
      params = optax.apply_updates(params, updates)
    return params, state

  full_params, full_state = run(params, tx.init(params), range(60))
  half_params, half_state = run(params, tx.init(params), range(30))
  half_state = _checkpoint_roundtrip(kind, half_state, tmp_path)
  half_params = jax.tree.map(jnp.asarray, jax.device_get(half_params))
  resumed_params, resumed_state = run(half_params, half_state, range(30, 60))
  for a, b in zip(jax.tree.leaves((full_params, full_state)),
                  jax.tree.leaves((resumed_params, resumed_state))):
    np.testing.assert_array_equal(a, b)
  assert int(bl.reselection_count(full_state)) >= 5
  del step


@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "nan_grad", "inf_grad"])
def test_non_finite_steps_leave_state_untouched(bad):
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.scale_by_blockllm(0.7, patience=2, min_interval=2)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for t in range(5):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    _, state = update(grads, state, params, value=loss + t)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  if bad.endswith("loss"):
    loss = jnp.float32(np.nan if bad == "nan_loss" else np.inf)
  else:
    poison = np.nan if bad == "nan_grad" else np.inf
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(poison), grads)
  updates, new_state = update(grads, state, params, value=loss + 100.0)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  for field in state._fields:
    if field != "skipped_count":
      np.testing.assert_array_equal(getattr(new_state, field),
                                    getattr(state, field), err_msg=field)
  assert int(new_state.skipped_count) == int(state.skipped_count) + 1


def test_non_finite_first_step_does_not_select():
  params, _ = tiny_models.mlp_problem()
  tx = bl.scale_by_blockllm(0.7)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(grads, state, params, value=jnp.nan)
  assert int(bl.reselection_count(state)) == 0
  _, state = tx.update(grads, state, params, value=1.0)
  assert int(bl.reselection_count(state)) == 1


def test_update_without_value_is_a_clear_error():
  params, _ = tiny_models.mlp_problem()
  tx = bl.blockllm(1e-3)
  state = tx.init(params)
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(params, state, params)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(learning_rate=-1.0), "learning_rate"), (dict(eps=-1e-8), "eps"),
    (dict(patience=0), "patience"), (dict(patience=2.5), "patience"),
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(min_interval=-1), "min_interval"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(topk_fraction=0.0), "topk_fraction"),
    (dict(stall_tolerance=-1.0), "stall_tolerance"),
    (dict(moment_dtype=jnp.int32), "moment_dtype"),
])
def test_bad_arguments_name_the_argument_and_range(kwargs, match):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=match) as info:
    bl.blockllm(**kwargs)
  if match not in ("patience", "min_interval", "moment_dtype"):
    assert "[" in str(info.value) or "(" in str(info.value)


def test_tree_without_eligible_float_leaf_is_an_error():
  tx = bl.blockllm(1e-3)
  with pytest.raises(ValueError, match="eligible"):
    tx.init({"embed_tokens": jnp.zeros((4, 4)), "lm_head": jnp.zeros((4, 4)),
             "step": jnp.zeros([], jnp.int32)})


def test_default_eligibility_excludes_embeddings_and_heads():
  params = {"model": {"embed_tokens": {"embedding": jnp.zeros((8, 4))},
                      "layers_0": {"q_proj": {"kernel": jnp.zeros((4, 4))}}},
            "lm_head": {"kernel": jnp.zeros((4, 8))},
            "transformer": {"wte": jnp.zeros((8, 4)), "wpe": jnp.zeros((8, 4)),
                            "h_0": {"c_attn": jnp.zeros((4, 4))}}}
  tx = bl.scale_by_blockllm(0.0, patience=1)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(grads, state, params, value=1.0)
  nonzero = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert nonzero == {"model": {"embed_tokens": {"embedding": False},
                               "layers_0": {"q_proj": {"kernel": True}}},
                     "lm_head": {"kernel": False},
                     "transformer": {"wte": False, "wpe": False,
                                     "h_0": {"c_attn": True}}}


def test_eligible_as_mask_pytree_and_predicate():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
  grads = {"a": jnp.ones(3), "b": jnp.ones(3)}
  for eligible in ({"a": False, "b": True}, lambda path, leaf: path[0].key == "b"):
    tx = bl.scale_by_blockllm(0.0, patience=1, eligible=eligible)
    updates, state = tx.update(grads, tx.init(params), params, value=1.0)
    assert float(jnp.abs(updates["a"]).sum()) == 0
    assert float(jnp.abs(updates["b"]).sum()) > 0


def test_topk_fraction_keeps_the_largest_adam_coordinates():
  params = {"w": jnp.zeros((10, 10))}
  rng = np.random.default_rng(0)
  tx = bl.scale_by_blockllm(0.0, patience=1, topk_fraction=0.2,
                            eligible=EVERYTHING)
  adam = optax.scale_by_adam()
  state, adam_state = tx.init(params), adam.init(params)
  for t in range(4):
    grads = {"w": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)}
    updates, state = tx.update(grads, state, params, value=1.0)
    dense, adam_state = adam.update(grads, adam_state)
    dense = np.asarray(dense["w"])
    if t == 0:  # The first Adam step is g / |g|: all magnitudes tie near 1.
      continue
    keep = np.abs(dense) >= np.sort(np.abs(dense).ravel())[-20]
    assert keep.sum() == 20
    np.testing.assert_allclose(updates["w"], np.where(keep, dense, 0),
                               rtol=5e-5, atol=1e-7)


def test_inside_chain_inject_hyperparams_and_apply_if_finite():
  params, loss_fn = tiny_models.mlp_problem()
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.apply_if_finite(
          optax.inject_hyperparams(bl.blockllm, static_args=("sparsity", "patience"))(
              learning_rate=optax.cosine_decay_schedule(1e-2, 50),
              sparsity=0.5, patience=3, min_interval=3),
          max_consecutive_errors=3))
  state = tx.init(params)
  step = jax.jit(tiny_models.train_step_fn(tx, loss_fn))
  first = float(loss_fn(params))
  for _ in range(50):
    params, state, loss = step(params, state)
  assert float(loss) < 0.8 * first
  mask = bl.selected(state, params)
  assert 0 < sum(bool(v) for v in jax.tree.leaves(mask)) < len(jax.tree.leaves(params))
  assert int(bl.reselection_count(state)) >= 1


def test_inject_hyperparams_without_static_sparsity_is_explained():
  params, _ = tiny_models.mlp_problem()
  tx = optax.inject_hyperparams(bl.blockllm)(learning_rate=1e-3, sparsity=0.5)
  state = tx.init(params)  # concrete arrays at init: fine
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(lambda g, s: tx.update(g, s, params, value=1.0))(grads, state)
  assert any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("moment_dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_params_stay_bf16_and_learn(moment_dtype):
  params, loss_fn = tiny_models.mlp_problem(dtype=jnp.bfloat16)
  tx = bl.blockllm(1e-2, sparsity=0.5, patience=5, moment_dtype=moment_dtype)
  state = tx.init(params)
  assert state[0].mu.dtype == moment_dtype
  step = jax.jit(tiny_models.train_step_fn(tx, loss_fn))
  first = float(loss_fn(params))
  for _ in range(30):
    params, state, loss = step(params, state)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  assert float(loss) < 0.9 * first


def _nearest_bf16_nu(g2, b2, steps):
  """NumPy model of a bfloat16 second moment rounded to nearest."""
  import ml_dtypes
  bf16 = ml_dtypes.bfloat16
  nu = np.zeros_like(g2).astype(bf16)
  for _ in range(steps):
    nu = (np.float32(b2) * nu.astype(np.float32)
          + np.float32(1 - b2) * g2).astype(bf16)
  return nu.astype(np.float32)


@pytest.mark.parametrize("make", [
    lambda md: bl.scale_by_blockllm(sparsity=0.0, patience=10**6,
                                    eligible=lambda p, x: True, moment_dtype=md),
    lambda md: bl.scale_by_badam(blocks=lambda path, leaf: 0, switch_every=10**6,
                                 moment_dtype=md),
], ids=["blockllm", "badam"])
def test_bfloat16_moments_are_rounded_stochastically(make):
  """A constant gradient for 3000 steps (b2 = 0.999): bias-corrected, the
  float32 second moment is g**2. Rounded to nearest, a bfloat16 one stalls
  at about half of that (the NumPy model below); rounded stochastically
  it stays unbiased: its mean over 4096 coordinates is within 2% of g**2."""
  steps, b2 = 3000, 0.999
  g = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, 4096), jnp.float32)
  params = {"w": jnp.zeros(4096, jnp.float32)}
  tx = make(jnp.bfloat16)

  @jax.jit
  def run(state):
    def body(_, state):
      return tx.update({"w": g}, state, params, value=jnp.float32(1.0))[1]
    return jax.lax.fori_loop(0, steps, body, state)

  state = run(tx.init(params))
  nu = np.asarray(state.nu[:4096].astype(jnp.float32)) / (1 - b2**steps)
  mu = np.asarray(state.mu[:4096].astype(jnp.float32)) / (1 - 0.9**steps)
  g2 = np.asarray(g) ** 2
  assert abs(np.mean(nu / g2) - 1) < 0.02, np.mean(nu / g2)
  assert abs(np.mean(mu / np.asarray(g)) - 1) < 0.01
  nearest = _nearest_bf16_nu(g2, b2, steps) / (1 - b2**steps)
  assert np.mean(nearest / g2) < 0.75  # what rounding to nearest would give


def test_float16_moments_that_overflow_stay_out_of_other_units():
  """``(1 - b2) g**2`` beyond float16's range (|g| = 1e4): the stored
  ``nu`` saturates at float16's largest value instead of becoming inf, so
  the unit's direction stays finite, and the unselected unit, whose clamped
  window read lands on that window, gets exactly 0 (its direction is its
  zero bias correction times those moments, with no select)."""
  params = {"a": jnp.zeros(8), "b": jnp.zeros(8)}
  tx = bl.scale_by_blockllm(0.5, patience=100, min_interval=100,
                            eligible=EVERYTHING, moment_dtype="float16")
  state = tx.init(params)
  grads = {"a": jnp.full(8, 1e4, jnp.float32), "b": jnp.ones(8, jnp.float32)}
  update = jax.jit(tx.update)
  for t in range(3):
    updates, state = update(grads, state, params, value=1.0)
    assert bl.selected(state, params) == {"a": True, "b": False}
    assert np.all(np.isfinite(np.asarray(updates["a"]))), t
    assert np.all(np.asarray(updates["b"]) == 0), t


@pytest.mark.parametrize("eps,eps_root", [(0.0, 0.0), (1e-8, 0.0),
                                          (0.0, 1e-16)])
def test_unselected_unit_gets_exact_zeros_whatever_eps(eps, eps_root):
  """The selected unit ``c`` (at offset 0) has zero-gradient coordinates,
  so its ``nu`` is 0 there; the unselected ``a`` reads that window
  (clamped). With ``eps = eps_root = 0`` Adam's quotient is 0 / 0 there
  (NaN for ``c`` itself, as in ``optax.adam``), and ``a`` must still get
  exactly 0."""
  params = {"a": jnp.ones((4, 4)), "c": jnp.ones((4, 4))}
  grads = {"a": jnp.full((4, 4), 0.1), "c": jnp.ones((4, 4)).at[0].set(0.0)}
  tx = bl.scale_by_blockllm(0.5, patience=5, eligible=EVERYTHING, eps=eps,
                            eps_root=eps_root)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, value=1.0)
  assert bl.selected(state, params) == {"a": False, "c": True}
  assert np.all(np.asarray(updates["a"]) == 0)
  adam = optax.scale_by_adam(eps=eps, eps_root=eps_root)
  want, _ = adam.update({"c": grads["c"]}, adam.init({"c": params["c"]}))
  np.testing.assert_allclose(updates["c"], want["c"], rtol=1e-6,
                             equal_nan=True)
