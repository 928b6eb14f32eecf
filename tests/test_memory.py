"""Memory structure: state bytes and XLA's compiled memory analysis on CPU."""

import jax
import optax
import pytest

import blockllm_jax as bl
from tests import tiny_models

EVERYTHING = lambda path, leaf: True


def _step_memory(tx, params, loss_fn):
  state = tx.init(params)
  step = tiny_models.train_step_fn(tx, loss_fn)
  return bl.compiled_memory(step, params, state, donate_argnums=(0, 1)), state


@pytest.mark.parametrize("clip", [False, True])
def test_transformer_step_saves_about_the_moment_bytes(clip):
  params = tiny_models.transformer_params(jax.random.PRNGKey(0), width=96,
                                          layers=3, vocab=256)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 256)
  loss_fn = lambda p: tiny_models.transformer_loss(p, tokens)
  prefix = [optax.clip_by_global_norm(1.0)] if clip else []
  adamw, adamw_state = _step_memory(
      optax.chain(*prefix, optax.adamw(1e-3)), params, loss_fn)
  ours, our_state = _step_memory(
      optax.chain(*prefix, bl.blockllm(1e-3, sparsity=0.9, eligible=EVERYTHING)),
      params, loss_fn)
  moment_saving = bl.state_bytes(adamw_state) - bl.state_bytes(our_state)
  saving = adamw.total - ours.total
  # The arguments shrink by exactly the state difference ...
  assert adamw.argument - ours.argument == moment_saving
  # ... and the temporaries (the gradient tree, activations) stay about equal.
  assert 0.9 * moment_saving <= saving <= 1.1 * moment_saving, (
      saving, moment_saving, adamw, ours)


def test_update_alone_needs_no_second_copy_of_the_moments():
  params = tiny_models.transformer_params(jax.random.PRNGKey(0), width=96,
                                          layers=8)
  tx = bl.scale_by_blockllm(0.9, eligible=EVERYTHING)
  state = tx.init(params)
  update = lambda g, s, p: tx.update(g, s, p, value=1.0)
  memory = bl.compiled_memory(update, params, state, params, donate_argnums=(1,))
  moment_bytes = state.mu.nbytes + state.nu.nbytes
  largest_leaf = max(p.nbytes for p in jax.tree.leaves(params))
  # Reselection repacks the moments in place: temporaries stay below the
  # per-leaf working set, far from another pair of moment buffers.
  assert memory.temp < moment_bytes, (memory, moment_bytes)
  assert memory.temp <= 8 * largest_leaf, (memory, largest_leaf)
  assert memory.alias >= moment_bytes  # the moments are updated in place
