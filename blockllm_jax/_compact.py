"""Compact Adam moments for a changing set of selected leaves.

The moments of all selected leaves live in two flat buffers of a fixed
``capacity`` (set at ``init``). Selected leaves are packed in ascending leaf
order: ``offset[i]`` is the sum of the sizes of the selected leaves before
leaf ``i``. A reselection therefore changes only *values* (``selected``,
``offset``, buffer contents), never shapes, and the whole run compiles once.

Leaf ``i`` occupies ``buffer[offset[i] : offset[i] + sizes[i]]``. Reads and
writes use ``lax.dynamic_slice`` / ``dynamic_update_slice`` with the static
size of the leaf; for an unselected leaf we read and write back the same
(clamped) window, which is a no-op, so no data-dependent shapes appear.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def read_leaf(buffer: jax.Array, offset: jax.Array, size: int) -> jax.Array:
  """The ``size`` entries of ``buffer`` starting at ``offset`` (clamped)."""
  return lax.dynamic_slice(buffer, (offset,), (size,))


def write_leaf(buffer: jax.Array, values: jax.Array,
               offset: jax.Array) -> jax.Array:
  return lax.dynamic_update_slice(buffer, values.astype(buffer.dtype),
                                  (offset,))


def greedy_fill(scores: jax.Array, sizes: jax.Array,
                capacity: int) -> jax.Array:
  """Selects leaves by descending score while they fit into ``capacity``.

  Exact fill: a leaf that does not fit is skipped and the scan goes on, so
  smaller leaves further down the ranking can still use the remaining room.
  Ties are broken by leaf order (stable sort).

  Args:
    scores: float[L] score per leaf.
    sizes: int32[L] coordinates per leaf.
    capacity: coordinates available.

  Returns:
    bool[L], the selected leaves.
  """
  order = jnp.argsort(-scores, stable=True)

  def take_if_fits(used, leaf):
    size = sizes[leaf]
    # Written as ``size <= capacity - used`` so the sum never overflows int32.
    fits = size <= capacity - used
    return used + jnp.where(fits, size, 0), fits

  _, taken = lax.scan(take_if_fits, jnp.zeros((), jnp.int32), order)
  return jnp.zeros(scores.shape, bool).at[order].set(taken)


def packed_offsets(selected: jax.Array, sizes: jax.Array) -> jax.Array:
  """int32[L] start of each leaf when selected leaves are packed in order."""
  used = jnp.where(selected, sizes, 0)
  return jnp.cumsum(used) - used


def repack(buffer: jax.Array, sizes: Sequence[int], old_offset: jax.Array,
           new_offset: jax.Array, kept: jax.Array,
           fresh: jax.Array) -> jax.Array:
  """Moves kept leaves to their new offsets in place and zeroes fresh ones.

  Both layouts keep selected leaves in ascending leaf order, so the move is a
  memmove of ordered segments: leaves moving towards the start are moved in
  ascending order, then leaves moving towards the end in descending order.
  No segment is overwritten before it has been moved, and no second buffer
  of ``capacity`` entries is needed.

  Args:
    buffer: the flat moment buffer.
    sizes: static size of every leaf.
    old_offset, new_offset: int32[L] offsets before and after.
    kept: bool[L], selected before and after (data to keep).
    fresh: bool[L], newly selected (moments restart at zero).

  Returns:
    The repacked buffer.
  """
  def move(buf, i, direction):
    moves = kept[i] & (direction * (new_offset[i] - old_offset[i]) > 0)
    # A leaf that does not move reads and rewrites its own window: a no-op.
    source = jnp.where(moves, old_offset[i], new_offset[i])
    return write_leaf(buf, read_leaf(buf, source, sizes[i]), new_offset[i])

  num_leaves = len(sizes)
  for i in range(num_leaves):
    buffer = move(buffer, i, -1)
  for i in reversed(range(num_leaves)):
    buffer = move(buffer, i, +1)
  for i in range(num_leaves):
    window = read_leaf(buffer, new_offset[i], sizes[i])
    buffer = write_leaf(buffer, jnp.where(fresh[i], 0, window), new_offset[i])
  return buffer


def bias_corrected_adam(grad: jax.Array, mu: jax.Array, nu: jax.Array,
                        count: jax.Array, b1, b2, eps, eps_root):
  """One Adam step on flat arrays, written as ``optax.scale_by_adam`` does.

  Args:
    grad: flat gradient, in the moment dtype.
    mu, nu: flat first / second moments.
    count: int32 number of steps including this one (>= 1).
    b1, b2, eps, eps_root: Adam hyperparameters.

  Returns:
    ``(direction, new_mu, new_nu)``; direction is the un-scaled Adam update.
  """
  new_mu = (1 - b1) * grad + b1 * mu
  new_nu = (1 - b2) * (grad**2) + b2 * nu
  return (adam_direction(new_mu, new_nu, count, b1, b2, eps, eps_root),
          new_mu, new_nu)


def adam_direction(mu: jax.Array, nu: jax.Array, count: jax.Array, b1, b2,
                   eps, eps_root) -> jax.Array:
  """The bias-corrected Adam direction from already updated moments."""
  mu_hat = mu / (1 - b1**count).astype(mu.dtype)
  nu_hat = nu / (1 - b2**count).astype(nu.dtype)
  return mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)


def keep_top_fraction(direction: jax.Array, fraction) -> jax.Array:
  """Zeroes all but the largest ``fraction`` of ``|direction|`` (ties kept).

  ``k = ceil(fraction * size)`` (at least 1) coordinates are kept; entries
  tied with the k-th largest magnitude are kept too.
  """
  size = direction.shape[0]
  magnitude = jnp.abs(direction)
  k = jnp.clip(jnp.ceil(fraction * size).astype(jnp.int32), 1, size)
  threshold = jnp.sort(magnitude)[size - k]
  return jnp.where(magnitude >= threshold, direction, 0)


def pack_leaves(leaves: Sequence[jax.Array], capacity: int,
                dtype) -> jax.Array:
  """Flattens ``leaves`` in order into one ``dtype[capacity]`` vector.

  Leaf ``k`` lands at the sum of the sizes before it; the tail after the
  last leaf is zero.
  """
  parts = [leaf.reshape(-1).astype(dtype) for leaf in leaves]
  used = sum(int(part.shape[0]) for part in parts)
  if used > capacity:
    raise ValueError(f"{used} coordinates do not fit into {capacity}.")
  parts.append(jnp.zeros([capacity - used], dtype))
  return jnp.concatenate(parts)
