"""The loss statistics and reselection rule against a pure-Python model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockllm_jax import _loss_trigger


def python_rule(history, loss, steps_since, patience, min_interval, tol):
  """Reference: compare with the mean of the last `patience` finite losses."""
  if not np.isfinite(loss) or len(history) < patience or steps_since < min_interval:
    return False
  mean = np.mean(np.asarray(history[-patience:], np.float32))
  return bool(loss >= mean - tol * abs(mean))


@pytest.mark.parametrize("patience,min_interval,tol", [(1, 0, 0.0), (4, 2, 0.0),
                                                        (5, 5, 1e-2), (3, 7, 0.1)])
def test_rule_matches_python_model_on_random_sequences(patience, min_interval, tol):
  rng = np.random.default_rng(patience)
  losses = np.cumsum(rng.normal(-0.01, 0.05, 400)) + 5.0
  losses[rng.integers(0, 400, 20)] = np.nan
  losses[rng.integers(0, 400, 5)] = np.inf
  window = jnp.zeros([patience], jnp.float32)
  count = jnp.zeros([], jnp.int32)
  stalled_fn = jax.jit(_loss_trigger.loss_improvement_stalled)
  push_fn = jax.jit(_loss_trigger.push_loss)
  history, steps_since, fired = [], 0, 0
  for loss in losses.astype(np.float32):
    got = bool(stalled_fn(window, count, jnp.float32(loss),
                          jnp.int32(steps_since), min_interval, tol))
    assert got == python_rule(history, loss, steps_since, patience,
                              min_interval, tol)
    fired += got
    steps_since = 0 if got else steps_since + 1
    window, count = push_fn(window, count, jnp.float32(loss))
    if np.isfinite(loss):
      history.append(loss)
  assert fired > 0


def test_window_count_never_overflows_and_keeps_order():
  patience = 3
  window = jnp.zeros([patience], jnp.float32)
  count = jnp.zeros([], jnp.int32)
  for i in range(20):
    window, count = _loss_trigger.push_loss(window, count, jnp.float32(i))
    assert int(count) <= 2 * patience + 1
  assert sorted(np.asarray(window).tolist()) == [17.0, 18.0, 19.0]


def test_non_finite_loss_is_not_pushed():
  window = jnp.arange(3, dtype=jnp.float32)
  count = jnp.array(3, jnp.int32)
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    new_window, new_count = _loss_trigger.push_loss(window, count, jnp.float32(bad))
    np.testing.assert_array_equal(new_window, window)
    assert int(new_count) == 3
