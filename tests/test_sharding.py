"""Sharded state on 8 simulated CPU devices (see conftest.py): same results
as one device, 1/8 of the state per device, no gathers, restore on another
mesh."""

import dataclasses
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import blockllm_jax as bl
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import causal_lm_loss
from tests import tiny_models

# Run by tests/test_multi_device.py in a subprocess with 8 simulated CPU
# devices (conftest.py); skipped in a one-device process.
pytestmark = pytest.mark.skipif(
    len(jax.devices()) < 8,
    reason="runs on 8 simulated devices via tests/test_multi_device.py")

OPTIMIZERS = {
    "blockllm": lambda s: bl.blockllm(1e-2, sparsity=0.8, patience=2,
                                      param_sharding=s),
    "badam": lambda s: bl.badam(1e-2, switch_every=2, order="random",
                                param_sharding=s),
    "bread-sgd": lambda s: bl.bread(1e-2, correction="sgd", switch_every=2,
                                    scope="partial", weight_decay=0.1,
                                    param_sharding=s),
}


def mesh_of(shape, names, devices=None):
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(
      np.asarray(devices[:int(np.prod(shape))]).reshape(shape), names)


def params_and_grads(steps, seed=0):
  """The tiny transformer (every big leaf divisible by 8) and a fixed
  sequence of gradients and losses, so both runs see the same inputs."""
  params = tiny_models.transformer_params(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                              p.dtype), params)
           for _ in range(steps)]
  # Rises every third step: BlockLLM's loss trigger fires.
  losses = [jnp.float32(10 - t + 3 * (t % 3 == 2)) for t in range(steps)]
  return params, grads, losses


def run(tx, params, grads, losses, state=None, sharding=None):
  put = (lambda x: x) if sharding is None else (
      lambda x: jax.device_put(x, sharding))
  if state is None:  # as the README says: init with the state's shardings
    state = tx.init(params) if sharding is None else jax.jit(
        tx.init, out_shardings=bl.state_sharding(tx, params, sharding))(
            put(params))
  params = put(params)
  update = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))
  for grad, loss in zip(grads, losses):
    updates, state = update(put(grad), state, params, loss)
    params = optax.apply_updates(params, updates)
  return params, state, update


@functools.lru_cache(maxsize=None)
def single_device_run(kind, steps=6):
  """The one-device reference run, shared by the tests below."""
  params, grads, losses = params_and_grads(steps)
  final_params, state, _ = run(OPTIMIZERS[kind](None), params, grads, losses)
  return final_params, state


def moments_by_leaf(state, params):
  """{leaf position: (mu, nu)} of the selected leaves of a one-device state."""
  inner = state[0]
  leaves = jax.tree.leaves(params)
  out = {}
  for k, index in enumerate(np.asarray(inner.leaf_index)):
    if bool(inner.selected[k]):
      start, size = int(inner.offset[k]), leaves[index].size
      out[int(index)] = (np.asarray(inner.mu[start:start + size]),
                         np.asarray(inner.nu[start:start + size]))
  return out


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def assert_same_moments(single_state, other_state, params):
  expected = moments_by_leaf(single_state, params)
  got = moments_by_leaf(other_state, params)
  assert expected.keys() == got.keys() and expected
  for index in expected:
    for e, g in zip(expected[index], got[index]):
      np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-9)


def test_fsdp_sharding_splits_the_largest_divisible_dimension():
  mesh = mesh_of((2, 4), ("data", "fsdp"))
  params = {"w": jnp.zeros((64, 256)), "odd": jnp.zeros((63, 65)),
            "norm": jnp.zeros(64), "tall": jnp.zeros((512, 4))}
  specs = jax.tree.map(lambda s: s.spec, bl.fsdp_sharding(params, mesh, "fsdp"))
  assert specs == {"w": P(None, "fsdp"), "odd": P(), "norm": P(),
                   "tall": P("fsdp", None)}
  every_axis = bl.fsdp_sharding(params, mesh)["w"].spec
  assert every_axis == P(None, ("data", "fsdp"))
  with pytest.raises(ValueError, match="axes"):
    bl.fsdp_sharding(params, mesh, "model")


@pytest.mark.parametrize("kind, mesh_shape", [
    ("blockllm", (8,)), ("badam", (8,)), ("bread-sgd", (8,)),
    ("blockllm", (2, 4)), ("bread-sgd", (2, 4))])
def test_sharded_updates_equal_the_single_device_run(kind, mesh_shape):
  params, grads, losses = params_and_grads(6)
  make = OPTIMIZERS[kind]
  single_params, single_state = single_device_run(kind)
  if mesh_shape == (8,):
    mesh = mesh_of((8,), ("fsdp",))
  else:  # FSDP over 4, replicated over a data axis of 2
    mesh = mesh_of((2, 4), ("data", "fsdp"))
  sharding = bl.fsdp_sharding(params, mesh, "fsdp")
  tx = make(sharding)
  sharded_params, sharded_state, update = run(tx, params, grads, losses,
                                              sharding=sharding)
  assert update._cache_size() == 1
  assert_trees_close(sharded_params, single_params)
  inner, single_inner = sharded_state[0], single_state[0]
  assert int(single_inner.selection_count) >= 3  # reselections / switches
  for field in ("selected", "selection_count", "count", "skipped_count"):
    np.testing.assert_array_equal(getattr(inner, field),
                                  getattr(single_inner, field))
  # The moments, brought back to the one-device layout, are the same.
  unsharded = bl.reshard_state(sharded_state, params, sharding, None,
                               jax.eval_shape(make(None).init, params))
  assert_same_moments(single_state, unsharded, params)
  # Updates come back sharded like the params.
  for p, s in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(sharding)):
    assert p.sharding.is_equivalent_to(s, p.ndim)


@pytest.mark.parametrize("kind", ["blockllm", "badam"])
def test_each_device_holds_an_eighth_of_the_state(kind):
  params, _, _ = params_and_grads(0)
  mesh = mesh_of((8,), ("fsdp",))
  sharding = bl.fsdp_sharding(params, mesh)
  single = OPTIMIZERS[kind](None).init(params)
  state = OPTIMIZERS[kind](sharding).init(jax.device_put(params, sharding))
  per_device = sum(leaf.addressable_shards[0].data.nbytes
                   for leaf in jax.tree.leaves(state))
  # Only the small selection vectors (and the norms, which are replicated
  # parameters) are not divided by 8.
  assert per_device * 8 <= 1.2 * bl.state_bytes(single)
  assert state[0].mu.sharding.spec == P(("fsdp",))
  assert {s.data.shape for s in state[0].mu.addressable_shards} == {
      (state[0].mu.size // 8,)}
  # ...and the helper gives exactly those shardings, before any allocation.
  helper = bl.state_sharding(OPTIMIZERS[kind](sharding), params, sharding)
  for leaf, expected in zip(jax.tree.leaves(state[0]),
                            jax.tree.leaves(helper[0]), strict=True):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)


def test_state_sharding_gives_param_like_leaves_the_param_shardings():
  params, _, _ = params_and_grads(0)
  mesh = mesh_of((8,), ("fsdp",))
  sharding = bl.fsdp_sharding(params, mesh)
  tx = optax.chain(optax.trace(0.9),
                   bl.blockllm(1e-3, param_sharding=sharding))
  helper = bl.state_sharding(tx, params, sharding)
  trace = helper[0].trace
  assert jax.tree.leaves(trace) == jax.tree.leaves(sharding)
  assert helper[1][0].mu.spec == P(("fsdp",))
  assert helper[1][0].selected.spec == P()
  # Optax's generic helper sees our buffers as non-parameters: replicated.
  generic = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, params), sharding,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  assert generic[1][0].mu.spec == P()
  state = jax.jit(tx.init, out_shardings=helper)(
      jax.device_put(params, sharding))
  assert state[1][0].mu.addressable_shards[0].data.size * 8 == state[1][0].mu.size


def _collectives(hlo_text):
  """(op, result element count) of every collective in an HLO module."""
  found = []
  for line in hlo_text.splitlines():
    match = re.search(r"=\s*\(?([a-z0-9]+)\[([0-9,]*)\][^ ]*\)?\s+"
                      r"(all-gather|all-reduce|all-to-all|collective-permute|"
                      r"reduce-scatter)(-start)?\(", line)
    if match:
      dims = [int(d) for d in match.group(2).split(",") if d]
      found.append((match.group(3), int(np.prod(dims, dtype=np.int64))))
  return found


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_compiled_update_gathers_nothing(kind):
  params, grads, losses = params_and_grads(1)
  mesh = mesh_of((8,), ("fsdp",))
  sharding = bl.fsdp_sharding(params, mesh)
  tx = OPTIMIZERS[kind](sharding)
  params = jax.device_put(params, sharding)
  state = tx.init(params)
  hlo = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v)).lower(
      jax.device_put(grads[0], sharding), state, params,
      losses[0]).compile().as_text()
  collectives = _collectives(hlo)
  num_leaves = len(jax.tree.leaves(params))
  # Only per-leaf norms and finiteness flags cross devices.
  assert all(op == "all-reduce" and size <= num_leaves
             for op, size in collectives), collectives
  assert "all-gather" not in hlo


def test_collective_parser_sees_the_gathers_of_a_replicating_program():
  # The check above must be able to fail: gathering a sharded leaf shows up.
  mesh = mesh_of((8,), ("fsdp",))
  x = jax.device_put(jnp.zeros((64, 64)), NamedSharding(mesh, P("fsdp")))
  hlo = jax.jit(lambda x: x * 2, out_shardings=NamedSharding(mesh, P())).lower(
      x).compile().as_text()
  assert ("all-gather", 64 * 64) in _collectives(hlo)


@pytest.mark.parametrize("kind, target", [
    ("blockllm", "data2xfsdp4"), ("badam", "fsdp4"), ("blockllm", "one-device")])
def test_orbax_restore_onto_another_mesh_resumes_the_run(kind, target,
                                                         tmp_path):
  import orbax.checkpoint as ocp
  params, grads, losses = params_and_grads(6)
  make = OPTIMIZERS[kind]
  reference, reference_state = single_device_run(kind)

  source_mesh = mesh_of((8,), ("fsdp",))
  source = bl.fsdp_sharding(params, source_mesh)
  half_params, half_state, _ = run(make(source), params, grads[:3],
                                   losses[:3], sharding=source)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", (half_params, half_state))
  checkpointer.wait_until_finished()

  if target == "one-device":
    mesh, destination = None, None
  else:
    mesh = (mesh_of((2, 4), ("data", "fsdp")) if target == "data2xfsdp4"
            else mesh_of((4,), ("fsdp",), jax.devices()[4:]))
    destination = bl.fsdp_sharding(params, mesh, "fsdp")
  # Restore the saved shapes onto the new devices, then relayout the state.
  on_target = lambda shape_of, spec: jax.ShapeDtypeStruct(
      shape_of.shape, shape_of.dtype,
      sharding=(jax.sharding.SingleDeviceSharding(jax.devices()[0])
                if mesh is None else NamedSharding(mesh, spec)))
  abstract_params = (jax.tree.map(lambda p: on_target(p, P()), params)
                     if mesh is None else jax.tree.map(
                         lambda p, s: on_target(p, s.spec), params,
                         destination))
  abstract_state = jax.tree.map(
      lambda x: on_target(x, P(tuple(mesh.axis_names)) if mesh is not None
                          and x.ndim == 1 and x.size == half_state[0].mu.size
                          else P()), half_state)
  restored_params, restored_state = checkpointer.restore(
      tmp_path / "ckpt", (abstract_params, abstract_state))
  tx = make(destination)
  state = bl.reshard_state(restored_state, params, source, destination,
                           jax.eval_shape(tx.init, params))
  if mesh is not None:
    for leaf, expected in zip(jax.tree.leaves(state[0]), jax.tree.leaves(
        bl.state_sharding(tx, params, destination)[0])):
      assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  resumed, resumed_state, _ = run(tx, restored_params, grads[3:], losses[3:],
                                  state=state, sharding=destination)
  assert_trees_close(resumed, reference)
  assert int(resumed_state[0].selection_count) == int(
      reference_state[0].selection_count)
  back = (resumed_state if mesh is None else bl.reshard_state(
      resumed_state, params, destination, None,
      jax.eval_shape(make(None).init, params)))
  assert_same_moments(reference_state, back, params)


LLAMA = LlamaSettings(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
LLAMA_OPTIMIZERS = {
    "blockllm": lambda s, **kw: bl.blockllm(3e-3, sparsity=0.5, patience=2,
                                            eligible=lambda path, leaf: True,
                                            param_sharding=s, **kw),
    "bread-sgd": lambda s, **kw: bl.bread(3e-3, correction="sgd",
                                          switch_every=2, scope="partial",
                                          weight_decay=0.1, param_sharding=s,
                                          **kw),
    "badam": lambda s, **kw: bl.badam(3e-3, switch_every=2, weight_decay=0.1,
                                      param_sharding=s, **kw),
}


class LlamaRun(NamedTuple):
  losses: list
  state: Any
  memory: bl.CompiledMemory
  hlo: str


@functools.lru_cache(maxsize=None)
def llama_run(kind, sharded, gradients="plain", scanned=False):
  """5 steps of a tiny LLaMA: one device, or params FSDP over 4 devices and
  the batch over data 2 x fsdp 4. ``gradients``: "plain"
  (`jax.value_and_grad`), "lean" (compute-lean) or "gradient-lean";
  ``scanned``: layers under nn.scan, one unit per layer (``layer_axis=0``)."""
  model = LlamaForCausalLM(dataclasses.replace(LLAMA, scan_layers=scanned))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))[
      "params"]
  loss_fn = lambda p, tokens: causal_lm_loss(
      model.apply({"params": p}, tokens), tokens)
  batches = [jax.random.randint(jax.random.PRNGKey(t), (8, 16), 0, 64)
             for t in range(5)]
  sharding, put_batch = None, lambda b: b
  if sharded:
    mesh = mesh_of((2, 4), ("data", "fsdp"))
    sharding = bl.fsdp_sharding(params, mesh, "fsdp", min_size=256)
    params = jax.device_put(params, sharding)
    put_batch = lambda b: jax.device_put(
        b, NamedSharding(mesh, P(("data", "fsdp"))))
  tx = LLAMA_OPTIMIZERS[kind](sharding, **(dict(layer_axis=0) if scanned
                                           else {}))
  if gradients == "plain":
    grad_fn = lambda p, state, tokens: jax.value_and_grad(loss_fn)(p, tokens)
  else:
    grad_fn = bl.lean_value_and_grad(loss_fn,
                                     compute_lean=gradients == "lean")

  def step(params, state, tokens):
    loss, grads = grad_fn(params, state, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  compiled = jax.jit(step).lower(params, state,
                                 put_batch(batches[0])).compile()
  losses = []
  for tokens in batches:
    params, state, loss = compiled(params, state, put_batch(tokens))
    losses.append(float(loss))
  return LlamaRun(losses, state, bl.CompiledMemory.of(compiled),
                  compiled.as_text())


def test_sharded_llama_training_matches_one_device_and_splits_memory():
  single = llama_run("blockllm", sharded=False)
  sharded = llama_run("blockllm", sharded=True)
  # Gradients of sharded matmuls sum in another order: close, not equal.
  np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-5)
  np.testing.assert_array_equal(sharded.state[0].selected,
                                single.state[0].selected)
  assert int(sharded.state[0].selection_count) >= 2
  # Per device: a quarter of the params, grads and moments (+ replicated
  # norms and the small vectors).
  assert sharded.memory.argument < 0.4 * single.memory.argument


@pytest.mark.parametrize("kind", ["blockllm"])
def test_sharded_scanned_llama_matches_one_device(kind):
  """Stacked units on a mesh: FSDP splits the weight axes, each device holds
  its shard of every layer's unit (the layer axis stays whole)."""
  single = llama_run(kind, sharded=False, scanned=True)
  sharded = llama_run(kind, sharded=True, scanned=True)
  np.testing.assert_allclose(sharded.losses, single.losses, rtol=2e-5)
  for field in ("selected", "selection_count"):
    np.testing.assert_array_equal(getattr(sharded.state[0], field),
                                  getattr(single.state[0], field))
  assert int(sharded.state[0].selection_count) >= 2
  assert sharded.state[0].selected.shape[0] > 7  # units per layer
  assert sharded.memory.argument < 0.4 * single.memory.argument


@pytest.mark.parametrize("kind, gradients", [
    ("blockllm", "lean"), ("blockllm", "gradient-lean"),
    ("bread-sgd", "lean")])
def test_sharded_lean_steps_match_one_device(kind, gradients):
  single = llama_run(kind, sharded=False)
  lean = llama_run(kind, sharded=True, gradients=gradients)
  np.testing.assert_allclose(lean.losses, single.losses, rtol=2e-5)
  for field in ("selected", "selection_count", "skipped_count"):
    np.testing.assert_array_equal(getattr(lean.state[0], field),
                                  getattr(single.state[0], field))
  assert int(lean.state[0].selection_count) >= 2  # reselections / switches
  # The packed gradient and moments stay split: each device holds its slice.
  mu = lean.state[0].mu
  assert mu.addressable_shards[0].data.size * 8 == mu.size
  assert lean.memory.argument < 0.4 * single.memory.argument


def _collective_shapes(hlo_text):
  """{(op, shape)} of every collective, tuple results expanded."""
  found = set()
  pattern = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|"
                       r"all-to-all|collective-permute|reduce-scatter)"
                       r"(-start)?\(")
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if match:
      for shape in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", match.group(1)):
        found.add((match.group(2), shape))
  return found


def test_the_sharded_lean_step_communicates_like_the_plain_one():
  plain = _collective_shapes(llama_run("blockllm", sharded=True).hlo)
  lean_run = llama_run("blockllm", sharded=True, gradients="lean")
  lean = _collective_shapes(lean_run.hlo)
  assert ("all-gather", "32,64") in plain  # the parser sees FSDP's gathers
  # The model's FSDP gathers only: nothing of the optimizer is gathered.
  assert {c for c in lean if c[0] == "all-gather"} <= plain
  # The packed gradient and the moments never cross devices (in whole or
  # per device); only per-leaf norms and flags are reduced besides the
  # model's own gradient sums.
  capacity = lean_run.state[0].mu.size
  for _, shape in lean:
    assert shape not in (str(capacity), str(capacity // 8)), lean
  extra = {c for c in lean - plain if c[1] not in ("", "1")}
  assert all(op == "all-reduce" for op, _ in extra), extra
  # Per device, the lean step needs about what the plain sharded one does.
  plain_memory = llama_run("blockllm", sharded=True).memory
  assert lean_run.memory.temp <= 1.2 * plain_memory.temp


@pytest.mark.parametrize("make, match", [
    (lambda s: bl.blockllm(1e-3, topk_fraction=0.5, param_sharding=s),
     "topk_fraction"),
])
def test_unsupported_combinations_are_clear_errors(make, match):
  params, _, _ = params_and_grads(0)
  sharding = bl.fsdp_sharding(params, mesh_of((8,), ("fsdp",)))
  with pytest.raises(ValueError, match=match):
    make(sharding)


def test_bad_param_sharding_names_the_argument():
  params, _, _ = params_and_grads(0)
  mesh = mesh_of((8,), ("fsdp",))
  uneven = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  uneven["block0"]["norm1"] = NamedSharding(mesh, P("fsdp"))
  uneven["embed"] = NamedSharding(mesh, P(None, None, "fsdp"))
  with pytest.raises(ValueError, match="param_sharding.*more entries"):
    bl.blockllm(1e-3, param_sharding=uneven).init(params)
  uneven["embed"] = NamedSharding(mesh, P())
  indivisible = {**params, "block0": {**params["block0"],
                                      "norm1": jnp.ones(60)}}
  with pytest.raises(ValueError, match="does not split evenly"):
    bl.badam(1e-3, param_sharding=uneven).init(indivisible)
  with pytest.raises(ValueError, match="structure"):
    bl.blockllm(1e-3, param_sharding={"embed": uneven["embed"]}).init(params)


def test_pretraining_example_on_a_mesh_tracks_one_device(tmp_path):
  from tests.test_finetune_demo import load_example
  from tests.test_pretrain_example import TINY
  pretrain = load_example("pretrain_llama")
  short = TINY + ["--steps", "12", "--eval-every", "12", "--save-every", "6"]
  single = pretrain.main(short + ["--out-dir", str(tmp_path / "one")])
  # The lean step, sharded: only the selected leaves' gradients, per device.
  sharded = pretrain.main(short + ["--out-dir", str(tmp_path / "mesh"),
                                   "--mesh", "data=2,fsdp=4", "--lean"])
  # Sharded matmuls sum in another order: close to the one-device run.
  np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-4)
  # Params and state split over fsdp=4 (replicated over data): well under
  # half of the one-device state per device.
  assert (sharded["state_bytes_per_device"]
          < 0.5 * single["state_bytes_per_device"])
  mu = sharded["opt_state"][0].mu
  assert mu.addressable_shards[0].data.size * 8 == mu.size
