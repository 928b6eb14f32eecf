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

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.lru_cache(maxsize=64)
def repeated_run(sizes: tuple[int, ...]) -> tuple[int, int, int]:
  """The longest stretch of ``sizes`` that repeats one pattern.

  A model's leaves come layer after layer with the same shapes, so their
  sizes repeat with the layer's period. Returns ``(start, period, repeats)``
  such that ``sizes[start + k * period + j] == sizes[start + j]`` for
  ``k < repeats``, chosen to leave the fewest leaves to unroll
  (``len(sizes) - period * repeats + period``); ``repeats`` is 1 when no
  pattern repeats.
  """
  num = len(sizes)
  best = (num, (0, num, 1))  # (leaves to unroll, run)
  values = np.asarray(sizes)
  for period in range(1, num // 2 + 1):
    same = values[period:] == values[:-period]  # same[i]: i matches i+period
    # Longest run of consecutive matches: the stretch [i, i + run + period).
    run_start, run, best_start, best_run = 0, 0, 0, 0
    for i, match in enumerate(same):
      if match:
        if run == 0:
          run_start = i
        run += 1
        if run > best_run:
          best_start, best_run = run_start, run
      else:
        run = 0
    repeats = (best_run + period) // period
    if repeats >= 2:
      unrolled = num - period * repeats + period
      if unrolled < best[0]:
        best = (unrolled, (best_start, period, repeats))
  return best[1]


def for_each_leaf(buffer, sizes: Sequence[int], body, reverse: bool = False):
  """``buffer = body(buffer, i, sizes[i])`` for every leaf ``i`` in order.

  ``buffer`` may be any pytree of arrays (e.g. a tuple of buffers).

  ``body`` needs a static window size, so a loop over leaves is unrolled;
  the stretch of leaves that repeats one pattern (the model's layers, see
  :func:`repeated_run`) runs as a ``lax.fori_loop`` over the repeats with
  one pattern unrolled in its body, ``i`` then traced. That keeps the
  program, and its compile time, from growing with the depth of the model.
  The loop carries the buffer, so XLA updates it in place.
  """
  sizes = tuple(int(s) for s in sizes)
  start, period, repeats = repeated_run(sizes)
  stop = start + period * repeats
  pattern = range(period)

  def one_repeat(k, buf):
    if reverse:
      k = repeats - 1 - k
    base = start + k * period
    for j in (reversed(pattern) if reverse else pattern):
      buf = body(buf, base + j, sizes[start + j])
    return buf

  def unrolled(buf, leaves):
    for i in (reversed(leaves) if reverse else leaves):
      buf = body(buf, i, sizes[i])
    return buf

  parts = [lambda b: unrolled(b, range(start)),
           lambda b: (lax.fori_loop(0, repeats, one_repeat, b) if repeats > 1
                      else one_repeat(0, b)),
           lambda b: unrolled(b, range(stop, len(sizes)))]
  for part in (reversed(parts) if reverse else parts):
    buffer = part(buffer)
  return buffer


def repack(buffers, sizes: Sequence[int], old_offset: jax.Array,
           new_offset: jax.Array, kept: jax.Array, fresh: jax.Array):
  """Moves kept leaves to their new offsets in place and zeroes fresh ones.

  Both layouts keep selected leaves in ascending leaf order, so the move is a
  memmove of ordered segments: leaves moving towards the start are moved in
  ascending order, then leaves moving towards the end in descending order.
  No segment is overwritten before it has been moved, and no second buffer
  of ``capacity`` entries is needed. Several buffers of the same layout
  (Adam's two moments) move together, in one pass over the leaves.

  Args:
    buffers: a flat buffer, or a tuple of flat buffers of one layout.
    sizes: static size of every leaf.
    old_offset, new_offset: int32[L] offsets before and after.
    kept: bool[L], selected before and after (data to keep).
    fresh: bool[L], newly selected (moments restart at zero).

  Returns:
    The repacked buffer(s), as passed.
  """
  single = not isinstance(buffers, (tuple, list))
  buffers = (buffers,) if single else tuple(buffers)

  def move(direction):
    def body(bufs, i, size):
      moves = kept[i] & (direction * (new_offset[i] - old_offset[i]) > 0)
      # A leaf that does not move reads and rewrites its own window: a no-op.
      source = jnp.where(moves, old_offset[i], new_offset[i])
      # Fresh leaves are zeroed in the second pass, in place: by then every
      # leaf before them has left their new window, and every leaf after
      # them is already in its own.
      clear = fresh[i] if direction > 0 else False
      return tuple(
          write_leaf(b, jnp.where(clear, 0, read_leaf(b, source, size)),
                     new_offset[i]) for b in bufs)
    return body

  buffers = for_each_leaf(buffers, sizes, move(-1))
  buffers = for_each_leaf(buffers, sizes, move(+1), reverse=True)
  return buffers[0] if single else buffers


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
