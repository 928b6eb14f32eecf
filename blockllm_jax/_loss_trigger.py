"""Fixed-size loss statistics and the BlockLLM reselection rule.

The last ``patience`` finite losses sit in a ring buffer. The rule (BlockLLM,
Ramesh et al. 2024, Alg. 1) reselects when the current loss is no better
than the moving average of the window. We also reselect when the loss
*stalls* (within a relative tolerance of that average) so that a
deterministic objective that plateaus moves on, and we wait at least
``min_interval`` steps after every selection so minibatch noise cannot
trigger a reselection every few steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_improvement_stalled(loss_window: jax.Array, loss_count: jax.Array,
                             loss: jax.Array, steps_since_selection: jax.Array,
                             min_interval, stall_tolerance) -> jax.Array:
  """Whether the loss has stopped improving (bool scalar).

  True iff all of: ``loss`` is finite; the window holds ``patience`` losses;
  at least ``min_interval`` steps passed since the last selection; and
  ``loss >= mean - stall_tolerance * |mean|`` where ``mean`` is the average
  of the window (the losses *before* this one), i.e. the loss rose above its
  moving average or came within the tolerance of it.

  Args:
    loss_window: float32[patience] ring buffer of previous finite losses.
    loss_count: int32[] number of finite losses pushed so far (wrapped by
      :func:`push_loss` to stay below ``2 * patience + 1``).
    loss: float32[] the current loss.
    steps_since_selection: int32[] steps taken with the current selection.
    min_interval: minimum ``steps_since_selection`` to reselect.
    stall_tolerance: relative tolerance of the stall test (0 = only a loss
      at or above the average triggers).
  """
  patience = loss_window.shape[0]
  mean = jnp.mean(loss_window)
  not_better = loss >= mean - stall_tolerance * jnp.abs(mean)
  return (jnp.isfinite(loss) & (loss_count >= patience)
          & (steps_since_selection >= min_interval) & not_better)


def push_loss(loss_window: jax.Array, loss_count: jax.Array,
              loss: jax.Array):
  """Appends a finite ``loss`` to the ring buffer; non-finite ones are ignored.

  Returns:
    ``(loss_window, loss_count)`` after the push.
  """
  patience = loss_window.shape[0]
  finite = jnp.isfinite(loss)
  slot = loss_count % patience
  written = loss_window.at[slot].set(loss.astype(loss_window.dtype))
  # Subtracting ``patience`` once the count passes ``2 * patience`` keeps
  # both the ring position and ``count >= patience`` while never overflowing.
  wrapped = jnp.where(loss_count >= 2 * patience, loss_count - patience,
                      loss_count)
  return (jnp.where(finite, written, loss_window),
          jnp.where(finite, wrapped + 1, loss_count))
