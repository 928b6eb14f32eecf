"""Stacked (scanned) layers: ``layer_axis`` against the same layers unstacked.

A model whose decoder layers run under ``lax.scan`` holds each projection of
every layer in one leaf. With ``layer_axis`` each layer's slice is a unit of
its own, so training must give exactly the parameters of the same model
written with one leaf per layer (up to float reassociation of the scanned
gradient), reselections and block switches included.
"""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl

LAYERS, WIDTH, HIDDEN, VOCAB = 4, 8, 12, 16


def unstacked_params(key):
  keys = jax.random.split(key, 3 * LAYERS + 1)
  params = {"embed": {"embedding": jax.random.normal(keys[0], (VOCAB, WIDTH))},
            "final_norm": {"scale": jnp.ones([WIDTH])}}
  for i in range(LAYERS):
    k1, k2, k3 = keys[1 + 3 * i:4 + 3 * i]
    params[f"layers_{i}"] = {
        "norm": {"scale": 1 + 0.1 * jax.random.normal(k3, (WIDTH,))},
        "up": {"kernel": jax.random.normal(k1, (WIDTH, HIDDEN)) / 3},
        "down": {"kernel": jax.random.normal(k2, (HIDDEN, WIDTH)) / 4},
    }
  return params


def stack(params, kernel_axis):
  """The same parameters with the layers stacked: norms on axis 0, kernels
  on ``kernel_axis`` (1: MaxText's ``(d_in, L, d_out)``)."""
  layers = [params[f"layers_{i}"] for i in range(LAYERS)]
  return {"embed": params["embed"], "final_norm": params["final_norm"],
          "layers": {
              "norm": {"scale": jnp.stack([p["norm"]["scale"] for p in layers])},
              "up": {"kernel": jnp.stack([p["up"]["kernel"] for p in layers],
                                         axis=kernel_axis)},
              "down": {"kernel": jnp.stack([p["down"]["kernel"]
                                            for p in layers],
                                           axis=kernel_axis)}}}


def unstack(params, kernel_axis):
  out = {"embed": params["embed"], "final_norm": params["final_norm"]}
  layers = params["layers"]
  for i in range(LAYERS):
    out[f"layers_{i}"] = {
        "norm": {"scale": layers["norm"]["scale"][i]},
        "up": {"kernel": jnp.take(layers["up"]["kernel"], i, kernel_axis)},
        "down": {"kernel": jnp.take(layers["down"]["kernel"], i,
                                    kernel_axis)}}
  return out


def _block(x, layer):
  h = x * layer["norm"]["scale"]
  return x + jnp.tanh(h @ layer["up"]["kernel"]) @ layer["down"]["kernel"]


def _head(params, x, tokens):
  x = x * params["final_norm"]["scale"]
  logits = x @ params["embed"]["embedding"].T
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def unstacked_loss(params, tokens):
  x = params["embed"]["embedding"][tokens]
  for i in range(LAYERS):
    x = _block(x, params[f"layers_{i}"])
  return _head(params, x, tokens)


def stacked_loss(kernel_axis):
  def loss(params, tokens):
    layers = params["layers"]
    if kernel_axis != 0:  # scan runs over axis 0
      layers = jax.tree.map(lambda a: jnp.moveaxis(a, kernel_axis, 0)
                            if a.ndim == 3 else a, layers)
    x = params["embed"]["embedding"][tokens]
    x, _ = jax.lax.scan(lambda x, layer: (_block(x, layer), None), x, layers)
    return _head(params, x, tokens)
  return loss


def layer_axis_of(kernel_axis):
  if kernel_axis == 0:
    return 0  # every leaf under `layers`
  # A callable: kernels on the middle axis, norms on axis 0.
  return lambda path, leaf: (None if "layers" not in str(path)
                             else kernel_axis if leaf.ndim == 3 else 0)


OPTIMIZERS = {
    "blockllm": lambda **kw: bl.blockllm(3e-2, sparsity=0.7, patience=2,
                                         min_interval=2, **kw),
    "blockllm-decay-topk": lambda **kw: bl.blockllm(
        3e-2, sparsity=0.7, patience=2, min_interval=2, weight_decay=0.1,
        topk_fraction=0.5, **kw),
    "badam": lambda **kw: bl.badam(3e-2, switch_every=2, order="random",
                                   weight_decay=0.1, **kw),
    "bread-sgd": lambda **kw: bl.bread(3e-2, correction="sgd",
                                       correction_scale=0.5, switch_every=2,
                                       **kw),
}


def _train(tx, loss_fn, params, steps=9, lean=0):
  state = tx.init(params)

  @jax.jit
  def step(params, state, tokens):
    if lean:  # 1: gradient-lean taps only, 2: compute-lean
      loss, grads = bl.lean_value_and_grad(loss_fn, compute_lean=lean == 2)(
          params, state, tokens)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  for i in range(steps):
    tokens = jax.random.randint(jax.random.PRNGKey(100 + i), (2, 7), 0, VOCAB)
    params, state = step(params, state, tokens)
  return params, state


@pytest.mark.parametrize("kernel_axis", [0, 1])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_stacked_trains_like_the_same_layers_unstacked(name, kernel_axis):
  flat = unstacked_params(jax.random.PRNGKey(0))
  want, want_state = _train(OPTIMIZERS[name](), unstacked_loss, flat)
  got, got_state = _train(
      OPTIMIZERS[name](layer_axis=layer_axis_of(kernel_axis)),
      stacked_loss(kernel_axis), stack(flat, kernel_axis))
  assert int(bl.reselection_count(got_state)) >= 3  # switches happened
  assert int(bl.reselection_count(got_state)) == int(
      bl.reselection_count(want_state))
  for path, a in jax.tree_util.tree_leaves_with_path(
      unstack(got, kernel_axis)):
    np.testing.assert_allclose(a, want_at(want, path), rtol=2e-5, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))
  # The per-layer selection, as unstacked leaves see it.
  mask = bl.selected(got_state, stack(flat, kernel_axis))
  flat_mask = bl.selected(want_state, flat)
  for key in ("norm", "up", "down"):
    leaf_mask = mask["layers"][key]["kernel" if key != "norm" else "scale"]
    assert leaf_mask.shape == (LAYERS,)
    np.testing.assert_array_equal(
        leaf_mask, [bool(flat_mask[f"layers_{i}"][key][
            "kernel" if key != "norm" else "scale"]) for i in range(LAYERS)])
  # Same units, same budget: the same state size.
  assert bl.state_bytes(got_state) == bl.state_bytes(want_state)


def want_at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


def test_sparsity_budget_is_met_on_stacked_units():
  params = stack(unstacked_params(jax.random.PRNGKey(0)), 0)
  layers = params["layers"]
  units = sum(int(np.prod(a.shape[1:])) * LAYERS
              for a in jax.tree.leaves(layers)) + WIDTH  # + final norm
  for sparsity in (0.5, 0.8, 0.9):
    tx = bl.scale_by_blockllm(sparsity, patience=2, layer_axis=0)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = tx.update(grads, state, params, value=jnp.float32(1.0))
    mask = bl.selected(state, params)
    chosen = sum(int(np.sum(mask["layers"][k][leaf])) * int(
        np.prod(layers[k][leaf].shape[1:]))
                 for k, leaf in (("norm", "scale"), ("up", "kernel"),
                                 ("down", "kernel")))
    chosen += WIDTH * int(mask["final_norm"]["scale"])
    budget = int(np.ceil((1 - sparsity) * units))
    largest = WIDTH * HIDDEN
    # Exact fill of the budget (rounded up to the largest unit), in units of
    # one layer: stacking does not force whole stacks in or out.
    assert chosen <= max(budget, largest)
    assert chosen >= budget - largest
    assert state.mu.shape[0] == max(budget, largest)


def test_badam_blocks_of_a_stacked_model_are_its_layers():
  params = stack(unstacked_params(jax.random.PRNGKey(0)), 1)
  blocks = bl.block_partition(params, layer_axis=layer_axis_of(1))
  assert [b for b, _ in blocks] == list(range(LAYERS))
  assert blocks[2][1] == ("layers/down/kernel[2]", "layers/norm/scale[2]",
                          "layers/up/kernel[2]")


def test_a_custom_block_rule_sees_the_layer_as_a_layer_key():
  params = stack(unstacked_params(jax.random.PRNGKey(0)), 0)
  seen = []

  def pairs(path, leaf):  # two layers per block, by the LayerKey
    del leaf
    layer = [k.idx for k in path if isinstance(k, bl.LayerKey)]
    seen.append(layer)
    return layer[0] // 2 if layer else None

  blocks = bl.block_partition(params, pairs, layer_axis=0)
  assert [b for b, _ in blocks] == [0, 1]
  assert len(blocks[1][1]) == 2 * 3  # layers 2 and 3 of three stacks
  assert [0] in seen and [LAYERS - 1] in seen


@pytest.mark.parametrize("layer_axis,match", [
    (3, r"layer_axis.*layers/down/kernel.*\[-3, 3\)"),
    (lambda path, leaf: 0 if leaf.ndim > 1 else None,
     r"layer_axis.*disagree"),  # the embedding has VOCAB rows, not LAYERS
    (True, r"layer_axis"),
    ({"a": 0}, r"layer_axis.*structure"),
])
def test_bad_layer_axis_is_an_error_naming_it(layer_axis, match):
  params = stack(unstacked_params(jax.random.PRNGKey(0)), 0)
  for tx in (bl.blockllm(1e-3, layer_axis=layer_axis),
             bl.badam(1e-3, layer_axis=layer_axis)):
    with pytest.raises(ValueError, match=match):
      tx.init(params)


def test_int_layer_axis_without_a_layer_stack_is_an_error():
  with pytest.raises(ValueError, match=r"layer_axis=0.*no"):
    bl.blockllm(1e-3, layer_axis=0).init(unstacked_params(
        jax.random.PRNGKey(0)))


def test_unsupported_combinations_say_so():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
  params = stack(unstacked_params(jax.random.PRNGKey(0)), 0)
  # The layer axis split over the mesh: a device would hold some layers.
  sharding = jax.tree.map(
      lambda _: jax.sharding.NamedSharding(mesh,
                                           jax.sharding.PartitionSpec("x")),
      params)
  for make in (bl.blockllm, bl.badam):
    with pytest.raises(ValueError, match="layer_axis.*splits over"):
      make(1e-3, layer_axis=0, param_sharding=sharding).init(params)
  tokens = jnp.zeros((1, 5), jnp.int32)
  middle = stack(unstacked_params(jax.random.PRNGKey(0)), 1)
  # Lean steps take a stack's layers one by one inside the scan that slices
  # them: not kernels moved to axis 0 first (the middle axis), not for a
  # correction that needs the whole gradient.
  cases = [(bl.blockllm(1e-3, layer_axis=layer_axis_of(1)), middle, 1, True),
           (bl.badam(1e-3, layer_axis=layer_axis_of(1)), middle, 1, False),
           (bl.bread(1e-3, correction="sgd", layer_axis=0), params, 0, True)]
  for tx, tree, axis, compute_lean in cases:
    state = tx.init(tree)
    grad_fn = bl.lean_value_and_grad(stacked_loss(axis),
                                     compute_lean=compute_lean)

    def step(params, state):
      loss, grads = grad_fn(params, state, tokens)
      return tx.update(grads, state, params, value=loss)

    with pytest.raises(ValueError, match="layer_axis"):
      jax.eval_shape(step, tree, state)


@pytest.mark.parametrize("name,compute_lean", [
    ("blockllm", True), ("blockllm-decay-topk", True), ("badam", True),
    ("badam", False)])
def test_lean_stacked_trains_like_the_same_layers_unstacked(name,
                                                            compute_lean):
  """Lean steps on a raw ``lax.scan`` over stacked layers (no Flax): each
  layer's gradient is taken inside the scan (kernels by the lean Dense,
  the norms' scales by a tap per layer; tier B alone: all by taps)."""
  flat = unstacked_params(jax.random.PRNGKey(0))
  want, want_state = _train(OPTIMIZERS[name](), unstacked_loss, flat)
  with warnings.catch_warnings():
    # Every layer taken over: no fallback warning.
    warnings.filterwarnings("error", message="compute_lean")
    got, got_state = _train(OPTIMIZERS[name](layer_axis=0), stacked_loss(0),
                            stack(flat, 0), lean=compute_lean + 1)
  assert int(bl.reselection_count(got_state)) >= 3
  assert int(bl.reselection_count(got_state)) == int(
      bl.reselection_count(want_state))
  for path, a in jax.tree_util.tree_leaves_with_path(unstack(got, 0)):
    np.testing.assert_allclose(a, want_at(want, path), rtol=2e-5, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", ["blockllm", "bread-sgd"])
def test_the_step_does_not_grow_with_the_number_of_stacked_layers(name):
  """One loop over a stack's layers, not one copy of the update per layer:
  the lowered program has the same size for 2 and 16 layers."""
  sizes = []
  for layers in (2, 16):
    params = {"final_norm": {"scale": jnp.ones([WIDTH])},
              "layers": {"up": {"kernel": jnp.ones([layers, WIDTH, HIDDEN])},
                         "down": {"kernel": jnp.ones([layers, HIDDEN, WIDTH])},
                         "norm": {"scale": jnp.ones([layers, WIDTH])}}}
    if name == "blockllm":
      tx = bl.blockllm(1e-3, sparsity=0.5, layer_axis=0)
    else:  # ascending: a random order's permutation grows with the blocks
      tx = bl.bread(1e-3, correction="sgd", switch_every=2,
                    order="ascending", layer_axis=0)
    state = tx.init(params)
    text = jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0)).lower(
        params, state, params).as_text()
    sizes.append(len(text.splitlines()))
  assert sizes[1] <= 1.05 * sizes[0], sizes
