"""BREAD: SGD / sign-SGD / LoRA corrections against hand-computed updates,
bf16 rounding, resume, and a training comparison on the demo's LLaMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl
from blockllm_jax import _rounding
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import add_lora
from blockllm_jax.models import causal_lm_loss
from tests import block_reference as ref
from tests.test_badam import _checkpoint_roundtrip
from tests.test_badam import block_of
from tests.test_badam import check_updates
from tests.test_badam import layered_params
from tests.test_badam import random_grads

LLAMA = LlamaSettings(vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)


@pytest.mark.parametrize("correction", ["sgd", "sign_sgd"])
@pytest.mark.parametrize("scope", ["all", "partial"])
def test_sgd_correction_equals_the_hand_computed_update(correction, scope):
  """Inactive blocks in scope move by -lr * scale * g (or sign g), with the
  learning-rate schedule; the active block gets Adam; the rest stays."""
  params = layered_params(4)
  schedule = optax.linear_schedule(1e-2, 1e-3, 12)
  tx = bl.bread(schedule, correction=correction, correction_scale=3.0,
                scope=scope, switch_every=2, order="random", seed=2,
                weight_decay=0.1)
  model = ref.BlockAdamModel(block_of(params), 4, 2, "random", seed=2,
                             learning_rate=schedule, weight_decay=0.1,
                             correction=correction, scale=3.0, scope=scope)
  state = check_updates(tx, model, params, steps=12)
  inner = state[0]
  # `corrected` flags the blocks the last step corrected.
  last = int(inner.active_block)
  positions = np.array([int(p.split("_")[1].split("/")[0])
                        for p in ref.flat(params) if p.startswith("layers_")])
  want = positions != last if scope == "all" else positions > last
  np.testing.assert_array_equal(inner.corrected, want)


def _lora_llama(layers=2):
  settings = LlamaSettings(vocab_size=32, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=layers, num_attention_heads=2,
                           num_key_value_heads=1)
  shapes = jax.eval_shape(LlamaForCausalLM(settings).init,
                          jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
  return add_lora(settings, params, 2, jax.random.PRNGKey(1))


@pytest.mark.parametrize("scope", ["all", "partial"])
def test_lora_correction_trains_adapters_of_inactive_blocks_with_adam(scope):
  """Adapters of the inactive blocks in scope get Adam at lr * scale,
  restarted at every switch; the active block's own adapters and the
  inactive kernels stay; the state holds the largest block period."""
  _, params = _lora_llama(layers=3)
  flat = ref.flat(params)
  layer = lambda p: int(p.split("/")[1].split("_")[1]) if "layers_" in p else None
  adapters = {p: layer(p) for p in flat if p.endswith(("lora_a", "lora_b"))}
  blocks = {p: layer(p) for p in flat if p not in adapters}
  tx = bl.bread(1e-2, correction="lora", correction_scale=2.0, scope=scope,
                switch_every=2, order="ascending")
  model = ref.BlockAdamModel(blocks, 3, 2, "ascending", adapters=adapters,
                             learning_rate=lambda t: 1e-2, correction="lora",
                             scale=2.0, scope=scope)
  state = check_updates(tx, model, params, steps=10)
  size = lambda paths: sum(int(np.prod(flat[p].shape)) for p in paths)
  periods = []
  for active in range(3):
    in_scope = [p for p, b in adapters.items()
                if (b != active if scope == "all" else b > active)]
    periods.append(size([p for p, b in blocks.items() if b == active]) +
                   size(in_scope))
  assert state[0].mu.size == max(periods)


def test_bf16_sgd_correction_moves_the_weights():
  """The original adds lr * g straight into bf16: below half an ulp it rounds
  away. With stochastic rounding the mean movement is the intended one."""
  rng = np.random.default_rng(0)
  shape = (64, 64)
  weights = jnp.asarray(0.5 + 0.1 * rng.uniform(size=shape), jnp.bfloat16)
  params = {"layers_0": {"w": jnp.zeros(4, jnp.bfloat16)},
            "layers_1": {"w": weights}}
  grads = {"layers_0": {"w": jnp.ones(4, jnp.bfloat16)},
           "layers_1": {"w": jnp.full(shape, 1.0, jnp.bfloat16)}}
  lr, scale, steps = 1e-4, 2.0, 20  # 2e-4 per step; half an ulp is ~1e-3
  step_size = lr * scale
  moved = {}
  for rounding in (True, False):
    tx = bl.bread(lr, correction="sgd", correction_scale=scale,
                  switch_every=1000, order="ascending",
                  stochastic_rounding=rounding)
    update = jax.jit(tx.update)
    p, state = params, tx.init(params)
    for _ in range(steps):
      updates, state = update(grads, state, p)
      p = optax.apply_updates(p, updates)
    assert p["layers_1"]["w"].dtype == jnp.bfloat16
    moved[rounding] = np.asarray(p["layers_1"]["w"], np.float32) - np.asarray(
        weights, np.float32)
  # Nearest rounding (and the original's bf16 add): nothing moves.
  original = weights - jnp.asarray(step_size, jnp.bfloat16) * grads[
      "layers_1"]["w"]
  assert np.all(np.asarray(original) == np.asarray(weights))
  assert np.all(moved[False] == 0)
  # Stochastic rounding: unbiased. Each coordinate's total is a sum of 20
  # steps of 0 or -ulp (ulp = 2**-8 on [0.5, 1)); mean over 4096 coordinates.
  ulp = 2.0**-8
  std_of_mean = ulp * np.sqrt(steps * 0.25 / moved[True].size)
  assert abs(moved[True].mean() + steps * step_size) < 6 * std_of_mean
  assert np.mean(moved[True] != 0) > 0.5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_is_unbiased_and_lands_on_neighbours(dtype):
  x = jnp.asarray(np.random.default_rng(1).normal(size=2048) * 3, jnp.float32)
  lo = np.asarray(x.astype(dtype).astype(jnp.float32))
  samples = jax.jit(jax.vmap(lambda k: _rounding.stochastic_round(
      x, dtype, k)))(jax.random.split(jax.random.PRNGKey(0), 400))
  samples = np.asarray(samples, np.float32)
  neighbours = np.stack([
      np.asarray(jnp.nextafter(x.astype(dtype),
                               jnp.asarray(s, dtype)).astype(jnp.float32))
      for s in (-np.inf, np.inf)])
  on_grid = (samples == lo) | (samples == neighbours[0]) | (
      samples == neighbours[1])
  assert on_grid.all()
  ulp = np.abs(neighbours[1] - neighbours[0]) / 2
  bias = (samples.mean(0) - np.asarray(x)) / ulp
  assert abs(bias.mean()) < 0.01 and np.all(np.abs(bias) < 0.35)
  exact = jnp.asarray([0.0, 1.0, -0.5, np.inf, -np.inf], jnp.float32)
  np.testing.assert_array_equal(
      _rounding.stochastic_round(exact, dtype, jax.random.PRNGKey(0)),
      exact.astype(dtype))
  nan = _rounding.stochastic_round(jnp.full(3, jnp.nan), dtype,
                                   jax.random.PRNGKey(0))
  assert bool(jnp.all(jnp.isnan(nan)))


def _draws_random_bits(fn, *args) -> bool:
  text = str(jax.make_jaxpr(fn)(*args))  # nested jaxprs included
  return "random_split" in text or "threefry" in text


def test_stochastic_rounding_without_narrow_params_is_the_identity():
  """Float32 parameters: the updates pass through, the key stays (no
  random numbers drawn: on CPU a key split is a loop in the program); a
  bf16 leaf in the tree draws them as before."""
  rounding = bl.stochastic_rounding(seed=3)
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones(3)}
  updates = {"a": jnp.full((4, 4), 1e-3), "b": jnp.full(3, -2e-3)}
  state = rounding.init(params)
  out, new_state = jax.jit(rounding.update)(updates, state, params)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(new_state.key, state.key)
  assert not _draws_random_bits(rounding.update, updates, state, params)
  mixed = {"a": params["a"].astype(jnp.bfloat16), "b": params["b"]}
  _, mixed_state = jax.jit(rounding.update)(updates, state, mixed)
  assert not np.array_equal(mixed_state.key, state.key)
  assert _draws_random_bits(rounding.update, updates, state, mixed)


@pytest.mark.parametrize("kind", ["pickle", "orbax"])
def test_resume_bf16_with_rounding_is_bit_identical(kind, tmp_path):
  params = layered_params(3, dtype=jnp.bfloat16)
  tx = bl.bread(1e-2, correction="sign_sgd", correction_scale=0.1,
                scope="partial", switch_every=3, order="random", seed=4)
  update = jax.jit(tx.update)
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng) for _ in range(20)]

  def run(params, state, steps):
    for t in steps:
      updates, state = update(grads[t], state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  full = run(params, tx.init(params), range(20))
  half = jax.device_get(run(params, tx.init(params), range(7)))
  half = _checkpoint_roundtrip(kind, half, tmp_path)
  resumed = run(*half, range(7, 20))
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_lora_correction_without_adapters_is_an_error():
  with pytest.raises(ValueError, match="lora_a"):
    bl.bread(1e-3, correction="lora").init(layered_params(2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(correction="adam"), "correction"), (dict(scope="some"), "scope"),
    (dict(correction_scale=-1.0), "correction_scale"),
    (dict(order="zigzag"), "order"), (dict(switch_every=0), "switch_every"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    bl.bread(1e-3, **kwargs)


def test_state_is_badams_for_sgd_corrections():
  params = layered_params(4)
  badam = bl.scale_by_badam().init(params)
  bread = bl.scale_by_bread("sign_sgd", scope="partial").init(params)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), badam) == jax.tree.map(
      lambda a: (a.shape, a.dtype), bread)
  assert bread.mu.size == 3 * 5 + 5  # the largest block: layers_3


def _pattern_batches(steps, batch=8, seq=16, vocab=64, seed=0):
  """Sequences x[k+1] = (5 x[k] + 3) mod vocab from random starts."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, vocab, (steps, batch))
  tokens = np.empty((steps, batch, seq), np.int32)
  tokens[..., 0] = starts
  for k in range(1, seq):
    tokens[..., k] = (5 * tokens[..., k - 1] + 3) % vocab
  return jnp.asarray(tokens)


def test_badam_and_bread_lower_the_loss_on_the_demo_llama():
  """The demo's LLaMA (2 layers, width 32) on a learnable token pattern: all
  lower the loss; the SGD correction makes far better use of the same steps
  than BAdam alone (LoRA's gain is small here and not asserted)."""
  model = LlamaForCausalLM(LLAMA)
  steps = 100
  batches = _pattern_batches(steps)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batches[0])["params"]
  lora_settings, _ = add_lora(LLAMA, params, 4, jax.random.PRNGKey(1))
  lora_params = jax.jit(lambda p: add_lora(LLAMA, p, 4, jax.random.PRNGKey(1))[
      1])(params)
  common = dict(switch_every=5, order="random", include_head=True)
  runs = {
      "badam": (bl.badam(3e-3, **common), model, params),
      "bread_sgd": (bl.bread(3e-3, correction="sgd", correction_scale=30.0,
                             **common), model, params),
      "bread_lora": (bl.bread(3e-3, correction="lora", **common),
                     LlamaForCausalLM(lora_settings), lora_params),
  }

  def train(tx, model, params):
    def loss_fn(params, tokens):
      return causal_lm_loss(model.apply({"params": params}, tokens), tokens)

    def step(carry, tokens):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params, value=loss)
      return (optax.apply_updates(params, updates), state), loss

    _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)),
                                               batches))(params)
    return np.asarray(losses)

  results = {name: train(*run) for name, run in runs.items()}
  first = results["badam"][0]
  final = {name: losses[-10:].mean() for name, losses in results.items()}
  print(f"\nloss after {steps} steps (from {first:.3f}):",
        {k: round(float(v), 3) for k, v in final.items()})
  for name, losses in results.items():
    assert abs(losses[0] - first) < 1e-4, name  # same model and data
    assert final[name] < 0.7 * first, (name, final)
  # Correcting the inactive blocks speeds BAdam up.
  assert final["bread_sgd"] < 0.5 * final["badam"]
