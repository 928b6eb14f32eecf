"""One contract suite over every block optimizer, plain and lean.

Each optimizer (BlockLLM, BAdam, BREAD with an SGD and with a LoRA
correction) runs a tiny LLaMA under ``optax.inject_hyperparams`` with a
learning-rate schedule, through ``jax.value_and_grad`` (plain) and through
:func:`blockllm_jax.lean_value_and_grad` (lean), and must:

- compile once for a run with reselections / block switches;
- skip a step whose loss and gradients are NaN or Inf, or whose gradients
  are finite but too large to square in float32 (Adam's second moment
  would become infinite, then NaN), leaving the state untouched but for
  ``skipped_count``;
- resume from a pickled state bit for bit;
- lower the loss; return float32 updates for bf16 parameters; reject bad
  shared arguments with an error naming them.
"""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import blockllm_jax as bl
from blockllm_jax import _introspect
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import LlamaSettings
from blockllm_jax.models import add_lora
from blockllm_jax.models import causal_lm_loss
from tests import tiny_models

SETTINGS = LlamaSettings(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2)

OPTIMIZERS = {
    "blockllm": (bl.blockllm, dict(sparsity=0.5, patience=2, min_interval=2,
                                   stall_tolerance=1.0),
                 ("sparsity", "patience")),
    "badam": (bl.badam, dict(switch_every=2, order="random"), ()),
    "bread-sgd": (bl.bread, dict(correction="sgd", correction_scale=2.0,
                                 switch_every=2), ("correction",)),
    "bread-lora": (bl.bread, dict(correction="lora", switch_every=2),
                   ("correction",)),
}
STEPS, RESUME_AT = 8, 5
# Loss scales of the bad steps: NaN and Inf make the loss and every
# gradient non-finite; 1e30 keeps the loss finite (about 4e30) and every
# gradient finite, but past sqrt(float32 max) ~ 1.8e19.
BAD_SCALES = {2: 1e30, 3: np.nan, 4: np.inf}


def _problem(name):
  params = LlamaForCausalLM(SETTINGS).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  settings = SETTINGS
  if name == "bread-lora":
    settings, params = add_lora(SETTINGS, params, 2, jax.random.PRNGKey(1))
  model = LlamaForCausalLM(settings)

  def loss_fn(params, tokens, scale):
    # See BAD_SCALES.
    return scale * causal_lm_loss(model.apply({"params": params}, tokens),
                                  tokens)
  return params, loss_fn


def _optimizer(name):
  alias, kwargs, static = OPTIMIZERS[name]
  return optax.inject_hyperparams(alias, static_args=static)(
      learning_rate=optax.linear_schedule(3e-2, 1e-2, STEPS), **kwargs)


def _batch(t):
  # One batch throughout, so that a falling loss is a fair expectation.
  del t
  return jax.random.randint(jax.random.PRNGKey(10), (4, 12), 0,
                            SETTINGS.vocab_size)


def _inner_fields(state):
  inner = _introspect.find_state(state)
  return {k: np.asarray(v) for k, v in inner._asdict().items()}


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_contract_run(name, lean):
  params, loss_fn = _problem(name)
  tx = _optimizer(name)
  grad_fn = (bl.lean_value_and_grad(loss_fn) if lean else
             lambda p, s, *a: jax.value_and_grad(loss_fn)(p, *a))

  @jax.jit
  def step(params, state, tokens, scale):
    loss, grads = grad_fn(params, state, tokens, scale)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  first = None
  saved = None
  for t in range(STEPS):
    if t == RESUME_AT:
      saved = pickle.loads(pickle.dumps(jax.device_get((params, state))))
    scale = BAD_SCALES.get(t, 1.0)
    before = _inner_fields(state)
    params, state, loss = step(params, state, _batch(t), jnp.float32(scale))
    if t in BAD_SCALES:  # skipped: nothing but the counter moves
      after = _inner_fields(state)
      # The lean passes fold gradients into the moments as they arrive
      # (no copy to restore): with a finite loss they have begun the step,
      # e.g. restarted a new block's moments, which the retried step does
      # again. The moments stay finite; the counters and selection do not
      # move.
      loose = ("mu", "nu") if lean and np.isfinite(BAD_SCALES[t]) else ()
      for key, value in before.items():
        if key == "skipped_count":
          continue
        if key in loose:
          assert np.all(np.isfinite(after[key])), key
        else:
          np.testing.assert_array_equal(after[key], value, err_msg=key)
      assert int(after["skipped_count"]) == int(before["skipped_count"]) + 1
      assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
    if first is None:
      first = float(loss)
  assert step._cache_size() == 1  # one compilation, selections included
  inner = _introspect.find_state(state)
  assert int(inner.skipped_count) == len(BAD_SCALES)
  assert int(bl.reselection_count(state)) >= 2
  assert float(loss) < first

  # Resume from the pickled state: bit for bit the uninterrupted run (host
  # arrays lose JAX's weak types, so the resumed run may compile again).
  resumed_params, resumed_state = saved
  for t in range(RESUME_AT, STEPS):
    resumed_params, resumed_state, _ = step(resumed_params, resumed_state,
                                            _batch(t), jnp.float32(1.0))
  for a, b in zip(jax.tree.leaves((params, state)),
                  jax.tree.leaves((resumed_params, resumed_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


SCALE_BY = {
    "blockllm": lambda **kw: bl.scale_by_blockllm(0.5, **kw),
    "badam": lambda **kw: bl.scale_by_badam(
        2, "ascending", blocks=lambda path, leaf: path[0].key, **kw),
    "bread-sgd": lambda **kw: bl.scale_by_bread(
        "sgd", switch_every=2, blocks=lambda path, leaf: path[0].key, **kw),
}


@pytest.mark.parametrize("name", list(SCALE_BY))
def test_bf16_params_get_float32_updates_and_stay_bf16(name):
  params, loss_fn = tiny_models.mlp_problem(dtype=jnp.bfloat16)
  tx = SCALE_BY[name]()
  grads = jax.grad(loss_fn)(params)
  updates, _ = jax.jit(lambda g, s: tx.update(g, s, params, value=1.0))(
      grads, tx.init(params))
  assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
  assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
  moved = optax.apply_updates(params, jax.tree.map(lambda u: -1e-2 * u,
                                                   updates))
  assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(moved))


@pytest.mark.parametrize("name", list(SCALE_BY))
@pytest.mark.parametrize("kwargs,match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps"),
    (dict(eps_root=-1.0), "eps_root"), (dict(weight_decay=-0.1),
                                        "weight_decay"),
    (dict(moment_dtype=jnp.int32), "moment_dtype"),
    (dict(moment_dtype="not a dtype"), "moment_dtype"),
])
def test_shared_bad_arguments_name_the_argument(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    SCALE_BY[name](**kwargs)
