"""BAdam against a NumPy schedule and per-leaf optax.scale_by_adam references."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import add_lora
from tests import block_reference as ref
from tests import tiny_models

TINY_LLAMA = LlamaSettings(vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2)


def layered_params(num_layers=4, seed=0, dtype=jnp.float32):
  """Layers of different sizes (the last is the largest), embedding, head."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  params = {"embed": normal(6, 3), "head": normal(3, 6), "norm": normal(3)}
  for i in range(num_layers):
    params[f"layers_{i}"] = {"w": normal(3, 2 + i), "b": normal(2 + i)}
  return params


def block_of(params):
  """The default rule, spelled out: layers_i -> i, everything else None."""
  return {path: (int(path.split("/")[0].split("_")[1])
                 if path.startswith("layers_") else None)
          for path in ref.flat(params)}


def random_grads(params, rng, scale=1.0):
  return jax.tree.map(
      lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, p.dtype), params)


def active_leaves(state, params):
  return {path for path, on in ref.flat(bl.selected(state, params)).items()
          if bool(on)}


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("switch_every,num_layers", [(1, 3), (3, 4), (2, 5)])
def test_schedule_matches_numpy_model(order, switch_every, num_layers):
  params = layered_params(num_layers)
  tx = bl.scale_by_badam(switch_every, order, seed=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  steps = 4 * num_layers * switch_every  # four passes
  want = ref.schedule(steps, switch_every, num_layers, order, seed=3)
  got = []
  for t in range(steps):
    _, state = update(grads, state, params)
    got.append(int(bl.active_block(state)))
    assert active_leaves(state, params) == {
        f"layers_{want[t]}/w", f"layers_{want[t]}/b"}, t
  np.testing.assert_array_equal(got, want)
  # Exactly `switch_every` steps per block, every block once per pass.
  runs = want.reshape(-1, switch_every)
  assert np.all(runs == runs[:, :1])
  for one_pass in runs[:, 0].reshape(4, num_layers):
    assert sorted(one_pass) == list(range(num_layers))
  if order == "random":  # a fresh permutation each pass
    assert len({tuple(p) for p in runs[:, 0].reshape(4, num_layers)}) > 1
  assert int(bl.reselection_count(state)) == steps // switch_every
  assert int(state.count) == steps


def check_updates(tx, model, params, steps, seed=0):
  """Runs ``tx`` on random gradients; every update and the active block must
  match the NumPy ``model``. Returns the final state."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  rng = np.random.default_rng(seed)
  for t in range(steps):
    grads = random_grads(params, rng)
    updates, state = update(grads, state, params)
    want, active = model.step(ref.flat(grads), ref.flat(params))
    for path, u in ref.flat(updates).items():
      np.testing.assert_allclose(u, want[path], rtol=2e-5, atol=1e-8,
                                 err_msg=f"step {t} {path}")
    assert int(bl.active_block(state)) == active
    params = optax.apply_updates(params, updates)
  return state


@pytest.mark.parametrize("order", ["ascending", "random"])
def test_updates_match_per_block_adam_restarted_at_switches(order):
  """Adam moments and bias correction restart at every switch; the
  always-active leaf keeps its own; weight decay and a learning-rate
  schedule apply to the trained leaves only."""
  params = layered_params(3)
  steps, switch_every = 14, 3
  schedule = optax.linear_schedule(1e-2, 1e-3, steps)
  tx = bl.badam(schedule, switch_every=switch_every, order=order, seed=1,
                weight_decay=0.1, always_active=lambda p, _: p[0].key == "norm")
  model = ref.BlockAdamModel(block_of(params), 3, switch_every, order, seed=1,
                             always={"norm"}, learning_rate=schedule,
                             weight_decay=0.1)
  check_updates(tx, model, params, steps)


def test_one_block_and_no_switch_equals_adamw():
  params, loss_fn = tiny_models.mlp_problem()
  steps = 25
  schedule = optax.cosine_decay_schedule(1e-2, steps)
  step_adamw = jax.jit(tiny_models.train_step_fn(
      optax.adamw(schedule, weight_decay=0.01), loss_fn))
  tx = bl.badam(schedule, switch_every=steps, blocks=lambda p, l: 0,
                weight_decay=0.01)
  step_badam = jax.jit(tiny_models.train_step_fn(tx, loss_fn))
  want, got = params, params
  adamw_state, badam_state = optax.adamw(schedule, weight_decay=0.01).init(
      params), tx.init(params)
  for _ in range(steps):
    want, adamw_state, _ = step_adamw(want, adamw_state)
    got, badam_state, _ = step_badam(got, badam_state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _llama_params(settings=TINY_LLAMA, dtype=jnp.float32):
  """Shapes only (``jax.ShapeDtypeStruct``): init and partitions need no more."""
  model = LlamaForCausalLM(settings, param_dtype=dtype)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 4), jnp.int32))["params"]


def test_default_blocks_on_llama_names():
  params = _llama_params()
  partition = bl.block_partition(params)
  assert [block_id for block_id, _ in partition] == [0, 1, 2]
  assert partition[1][1] == tuple(sorted(
      p for p in ref.flat(params) if p.startswith("model/layers_1/")))
  full = bl.block_partition(params, include_embedding=True, include_head=True)
  assert [block_id for block_id, _ in full] == [-1, 0, 1, 2, "head"]
  assert full[0][1] == ("model/embed_tokens/embedding",)
  assert full[-1][1] == ("lm_head/kernel", "model/norm/weight")
  grouped = bl.block_partition(params, layers_per_block=2)
  assert [block_id for block_id, _ in grouped] == [0, 1]
  assert len(grouped[0][1]) == 2 * len(partition[0][1])
  # Paths as lists (`layers/3`) and GPT-2's `h/3`; LoRA adapters stay in
  # their layer's block for BAdam.
  other = {"h": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}],
           "transformer": {"layers": {"10": {"w": jnp.ones(2)}}}}
  assert [b for b, _ in bl.block_partition(other)] == [0, 1, 10]
  _, lora = add_lora(TINY_LLAMA, params, 2, jax.random.PRNGKey(1))
  assert "model/layers_0/self_attn/q_proj/lora_a" in bl.block_partition(lora)[0][1]


def test_custom_rule_orders_ints_then_natural_strings():
  params = {"x": jnp.ones(2), "y10": jnp.ones(3), "y2": jnp.ones(4),
            "z": jnp.ones(5), "skip": jnp.ones(6)}
  rule = lambda path, leaf: {"x": 7, "y10": "y10", "y2": "y2", "z": -3}.get(
      path[0].key)
  partition = bl.block_partition(params, rule)
  assert [b for b, _ in partition] == [-3, 7, "y2", "y10"]
  tx = bl.scale_by_badam(1, "ascending", blocks=rule)
  state = tx.init(params)
  assert state.mu.shape == (5,)  # the largest block, "z"
  update = jax.jit(tx.update)
  seen = []
  for _ in range(4):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state)
    seen.append([k for k, u in updates.items() if bool(jnp.any(u != 0))])
  assert seen == [["z"], ["x"], ["y2"], ["y10"]]


def _state_overhead_bytes(num_blocks, num_leaves):
  # count, active_block, selection_count, skipped_count: int32[]; key:
  # uint32[2]; permutation: int32[B]; selected, corrected: bool[L];
  # offset, leaf_index, unit_layer: int32[L].
  return 4 * 4 + 8 + 4 * num_blocks + 2 * num_leaves + 12 * num_leaves


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_bytes_are_two_moments_of_the_largest_block(dtype):
  params = _llama_params(dtype=dtype)
  partition = bl.block_partition(params)
  sizes = {p: int(np.prod(x.shape)) for p, x in ref.flat(params).items()}
  largest = max(sum(sizes[p] for p in paths) for _, paths in partition)
  num_leaves = sum(len(paths) for _, paths in partition)
  state = bl.scale_by_badam().init(params)
  assert state.mu.size == state.nu.size == largest
  assert bl.state_bytes(state) == 2 * 4 * largest + _state_overhead_bytes(
      len(partition), num_leaves)
  # The whole alias: + the rounding key (a constant learning rate has no
  # state).
  assert bl.state_bytes(bl.badam(1e-3).init(params)) == bl.state_bytes(
      state) + 8
  # Always-active leaves add their own moments.
  head = lambda path, leaf: path[0].key == "lm_head"
  with_head = bl.scale_by_badam(always_active=head).init(params)
  assert with_head.mu.size == largest + sizes["lm_head/kernel"]


def test_state_bytes_report_against_adamw_and_blockllm():
  params = _llama_params()
  adamw = bl.state_bytes(optax.adamw(1e-3).init(params))
  badam = bl.state_bytes(bl.badam(1e-3).init(params))
  blockllm = bl.state_bytes(bl.blockllm(1e-3, sparsity=0.9).init(params))
  param_bytes = bl.state_bytes(params)
  print(f"\nparams {param_bytes} B; optimizer state: adamw {adamw} B, "
        f"badam {badam} B, blockllm(0.9) {blockllm} B")
  # The moments of one layer out of three (plus embedding and head).
  largest = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(
      params["model"]["layers_0"]))
  total = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert badam <= 1.01 * adamw * largest / total


def test_state_from_shapes_and_empty_tree():
  abstract = params = _llama_params()
  tx = bl.badam(1e-3)
  concrete = tx.init(jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype),
                                  params))
  shapes = jax.eval_shape(tx.init, abstract)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
      lambda a: (a.shape, a.dtype), concrete)
  updates, _ = tx.update({}, tx.init({}), {})
  assert updates == {}


def test_one_compilation_for_a_run_with_switches():
  params, loss_fn = tiny_models.mlp_problem()
  tx = bl.badam(1e-2, switch_every=2, order="random",
                blocks=lambda path, leaf: path[0].key)
  traces = []

  def step(params, state):
    traces.append(1)
    return tiny_models.train_step_fn(tx, loss_fn)(params, state)

  step = jax.jit(step)
  state = tx.init(params)
  first = float(loss_fn(params))
  for _ in range(40):
    params, state, loss = step(params, state)
  assert len(traces) == 1 and step._cache_size() == 1
  assert int(bl.reselection_count(state)) == 20
  assert float(loss) < 0.8 * first


def _checkpoint_roundtrip(kind, tree, tmp_path):
  if kind == "pickle":
    return pickle.loads(pickle.dumps(jax.device_get(tree)))
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "orbax", tree)
  checkpointer.wait_until_finished()
  return checkpointer.restore(tmp_path / "orbax", tree)


@pytest.mark.parametrize("kind", ["pickle", "orbax"])
def test_resume_mid_block_switches_like_an_uninterrupted_run(kind, tmp_path):
  params = layered_params(4)
  tx = bl.badam(1e-2, switch_every=3, order="random", seed=5)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng) for _ in range(30)]

  def run(params, state, steps):
    actives = []
    for t in steps:
      updates, state = update(grads[t], state, params)
      params = optax.apply_updates(params, updates)
      actives.append(int(bl.active_block(state)))
    return params, state, actives

  full_params, full_state, full_actives = run(params, tx.init(params),
                                              range(30))
  half = run(params, tx.init(params), range(13))  # stops inside a block
  half_params, half_state = _checkpoint_roundtrip(kind, half[:2], tmp_path)
  resumed_params, resumed_state, actives = run(half_params, half_state,
                                               range(13, 30))
  assert half[2] + actives == full_actives
  for a, b in zip(jax.tree.leaves((full_params, full_state)),
                  jax.tree.leaves((resumed_params, resumed_state))):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["nan_loss", "inf_grad"])
def test_non_finite_steps_leave_state_and_schedule_untouched(bad):
  params = layered_params(3)
  tx = bl.scale_by_badam(2, "ascending")
  update = jax.jit(tx.update)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    _, state = update(grads, state, params, value=1.0)
  value, poisoned = 1.0, grads
  if bad == "nan_loss":
    value = jnp.nan
  else:  # in the active block (block 1 trains at steps 2 and 3)
    poisoned = dict(grads, layers_1={"w": grads["layers_1"]["w"].at[0, 0].set(
        jnp.inf), "b": grads["layers_1"]["b"]})
  updates, new_state = update(poisoned, state, params, value=value)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  for field in state._fields:
    if field != "skipped_count":
      np.testing.assert_array_equal(getattr(new_state, field),
                                    getattr(state, field), err_msg=field)
  assert int(new_state.skipped_count) == 1
  # The block still gets its two finite steps: the next is block 1's second.
  _, new_state = update(grads, new_state, params, value=1.0)
  assert int(bl.active_block(new_state)) == 1
  _, new_state = update(grads, new_state, params, value=1.0)
  assert int(bl.active_block(new_state)) == 2


def test_non_finite_gradients_of_unused_leaves_are_ignored():
  """Frozen leaves and inactive blocks do not take part in a BAdam step."""
  params = layered_params(3)
  grads = jax.tree.map(jnp.ones_like, params)
  grads["embed"] = grads["embed"].at[0, 0].set(jnp.nan)
  grads["layers_2"]["w"] = grads["layers_2"]["w"].at[0, 0].set(jnp.inf)
  tx = bl.scale_by_badam(2, "ascending")
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert int(state.skipped_count) == 0 and int(state.count) == 1
  assert bool(jnp.all(updates["layers_0"]["w"] != 0))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_bf16_updates_come_back_in_float32_and_round_stochastically():
  params, loss_fn = tiny_models.mlp_problem(dtype=jnp.bfloat16)
  rule = lambda path, leaf: path[0].key
  scale_by = bl.scale_by_badam(blocks=rule)
  updates, _ = jax.jit(scale_by.update)(jax.tree.map(jnp.ones_like, params),
                                        scale_by.init(params))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  tx = bl.badam(1e-2, switch_every=5, blocks=rule)
  state = tx.init(params)
  step = jax.jit(tiny_models.train_step_fn(tx, loss_fn))
  first = float(loss_fn(params))
  for _ in range(30):
    params, state, loss = step(params, state)
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
  assert float(loss) < 0.9 * first


def test_inside_chain_inject_hyperparams_and_apply_if_finite():
  params, loss_fn = tiny_models.mlp_problem()
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.apply_if_finite(
          optax.inject_hyperparams(bl.badam, static_args=("blocks",))(
              learning_rate=optax.cosine_decay_schedule(1e-2, 40),
              switch_every=4, blocks=lambda path, leaf: path[0].key),
          max_consecutive_errors=3))
  state = tx.init(params)
  step = jax.jit(tiny_models.train_step_fn(tx, loss_fn))
  first = float(loss_fn(params))
  for _ in range(40):
    params, state, loss = step(params, state)
  assert float(loss) < 0.8 * first
  assert sum(bool(v) for v in jax.tree.leaves(bl.selected(state, params))) == 2
  assert int(bl.reselection_count(state)) == 10


@pytest.mark.parametrize("kwargs,match", [
    (dict(order="sideways"), "order"), (dict(order=None), "order"),
    (dict(switch_every=0), "switch_every"),
    (dict(switch_every=2.5), "switch_every"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(learning_rate=-1.0), "learning_rate"),
    (dict(b1=1.0), "b1"), (dict(eps=-1.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(moment_dtype=jnp.int32), "moment_dtype"),
    (dict(blocks=3), "blocks"),
    (dict(blocks=lambda p, l: 0, include_head=True), "include_head"),
    (dict(blocks=lambda p, l: 0, layers_per_block=2), "layers_per_block"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  kwargs = {"learning_rate": 1e-3, **kwargs}
  with pytest.raises(ValueError, match=match):
    bl.badam(**kwargs)


@pytest.mark.parametrize("kwargs,params,match", [
    (dict(), {"embed": jnp.ones(3), "lm_head": jnp.ones(3)}, "no float leaf"),
    (dict(blocks=lambda p, l: None), {"layers_0": jnp.ones(3)}, "no float leaf"),
    (dict(blocks=lambda p, l: 1.5), {"layers_0": jnp.ones(3)}, "int or str"),
    (dict(include_embedding=True), {"layers_0": jnp.ones(3)}, "include_embedding"),
    (dict(include_head=True), {"layers_0": jnp.ones(3)}, "include_head"),
    (dict(always_active={"a": True}), {"layers_0": jnp.ones(3)}, "always_active"),
])
def test_trees_the_rule_cannot_schedule_are_errors_at_init(kwargs, params, match):
  with pytest.raises(ValueError, match=match):
    bl.badam(1e-3, **kwargs).init(params)


def test_value_is_accepted_but_not_needed():
  params = layered_params(2)
  tx = bl.badam(1e-3)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  update = jax.jit(tx.update)
  a, _ = update(grads, state, params)
  b, _ = update(grads, state, params, value=jnp.float32(2.0), extra=1)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_step_memory_saves_the_moments_and_rounding_costs_nothing():
  """Compiled bf16 train step (XLA memory analysis): BAdam saves about
  AdamW's moment bytes minus its own, and stochastic rounding adds no
  temporaries (its random bits are hashed in place, never materialised)."""
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                        tiny_models.transformer_params(
                            jax.random.PRNGKey(0), width=64, layers=3,
                            vocab=256))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 17), 0, 256)
  loss_fn = lambda p: tiny_models.transformer_loss(p, tokens).astype(
      jnp.float32)

  def memory(tx):
    state = tx.init(params)
    step = tiny_models.train_step_fn(tx, loss_fn)
    return bl.compiled_memory(step, params, state,
                              donate_argnums=(0, 1)), bl.state_bytes(state)

  adamw, adamw_state = memory(optax.adamw(1e-3))
  badam, badam_state = memory(bl.badam(1e-3))
  plain, _ = memory(bl.badam(1e-3, stochastic_rounding=False))
  moment_saving = adamw_state - badam_state
  assert adamw.total - badam.total >= 0.9 * moment_saving, (adamw, badam)
  print(f"\nbf16 step: adamw {adamw}, badam {badam}, no rounding {plain}")
  assert badam.temp - plain.temp <= 0.02 * bl.state_bytes(params), (badam,
                                                                     plain)
