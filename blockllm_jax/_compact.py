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

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax


# Offsets are never negative: no wrap-around of negative indices, whose
# per-call computation XLA would otherwise give a kernel of its own per leaf.
def read_leaf(buffer: jax.Array, offset: jax.Array, size: int) -> jax.Array:
  """The ``size`` entries of ``buffer`` starting at ``offset`` (clamped)."""
  return lax.dynamic_slice(buffer, (offset,), (size,),
                           allow_negative_indices=False)


def write_leaf(buffer: jax.Array, values: jax.Array,
               offset: jax.Array) -> jax.Array:
  """``buffer`` with ``values`` written at ``offset`` (clamped)."""
  return lax.dynamic_update_slice(buffer, values.astype(buffer.dtype),
                                  (offset,), allow_negative_indices=False)


def counted_loop(num: int, body, carry):
  """``lax.fori_loop(0, num, body, carry)`` as a while loop with one counter.

  ``fori_loop`` with static bounds lowers through ``scan``, whose loop carries
  a second counter; XLA proves the two equal only over several rounds of
  its simplification pipeline, and each round is a pass over the whole
  program, so the loop would make the model's compile time longer at every
  depth.

  Args:
    num: the number of iterations (static).
    body: ``(index, carry) -> carry``, ``index`` an int32 scalar.
    carry: the initial carry.

  Returns:
    The final carry.
  """
  def step(state):
    index, carry = state
    return index + 1, body(index, carry)
  _, carry = lax.while_loop(lambda state: state[0] < num, step,
                            (jnp.zeros((), jnp.int32), carry))
  return carry


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
  leaves = jnp.arange(scores.shape[0], dtype=order.dtype)

  def take_if_fits(rank, carry):
    used, taken = carry
    leaf = order[rank]
    size = sizes[leaf]
    # Written as ``size <= capacity - used`` so the sum never overflows int32.
    fits = size <= capacity - used
    # A mask, not a scatter of the decisions by `order` afterwards: a
    # smaller program to compile, the same result.
    return used + jnp.where(fits, size, 0), taken | ((leaves == leaf) & fits)

  _, taken = counted_loop(scores.shape[0], take_if_fits,
                          (jnp.zeros((), jnp.int32),
                           jnp.zeros(scores.shape, bool)))
  return taken


def packed_offsets(selected: jax.Array, sizes: jax.Array) -> jax.Array:
  """int32[L] start of each leaf when selected leaves are packed in order."""
  used = jnp.where(selected, sizes, 0)
  return jnp.cumsum(used) - used


# Coordinates a repack moves per loop iteration, by default a quarter of the
# largest leaf (its index and value temporaries then stay below the leaf-sized
# windows a step already works with) within these bounds: few iterations,
# at most a few MB of temporaries.
_MIN_CHUNK, _MAX_CHUNK = 1 << 10, 1 << 20


def repack(buffers, sizes: Sequence[int], old_offset: jax.Array,
           new_offset: jax.Array, kept: jax.Array, fresh: jax.Array, *,
           chunk: Optional[int] = None):
  """Moves kept leaves to their new offsets in place and zeroes fresh ones.

  Both layouts keep selected leaves in ascending leaf order, so the move is
  a memmove of ordered segments: positions whose leaf moves towards the
  start are filled in ascending order, then positions whose leaf moves
  towards the end in descending order. No value is overwritten before it
  has been moved, and no second buffer of ``capacity`` entries is needed.

  Both passes are one ``lax.fori_loop`` over fixed-size chunks of the
  buffer (ascending, then descending; the pass is data, so the loop body
  is compiled once): every position of a chunk finds its leaf in the new
  layout (a binary search of the offsets), gathers its value from the old
  window, and the chunk is written back in place. The program is the same
  for any number of leaves (its compile time does not grow with the
  model's depth).

  Args:
    buffers: a flat buffer, or a tuple of flat buffers of one layout
      (Adam's two moments move together).
    sizes: size of every leaf (static).
    old_offset, new_offset: int32[L] offsets before and after.
    kept: bool[L], selected before and after (data to keep).
    fresh: bool[L], newly selected (moments restart at zero).
    chunk: positions per loop iteration (default: a quarter of the largest
      leaf, between 2**10 and 2**20).

  Returns:
    The repacked buffer(s), as passed.
  """
  single = not isinstance(buffers, (tuple, list))
  buffers = (buffers,) if single else tuple(buffers)
  capacity = int(buffers[0].shape[0])
  num_leaves = int(kept.shape[0])
  if capacity == 0 or num_leaves == 0:
    return buffers[0] if single else buffers
  if chunk is None:
    chunk = min(max(max(sizes) // 4, _MIN_CHUNK), _MAX_CHUNK)
  chunk = max(1, min(int(chunk), capacity))
  num_chunks = -(-capacity // chunk)
  sizes = jnp.asarray(sizes, jnp.int32)
  old_offset = old_offset.astype(jnp.int32)
  new_offset = new_offset.astype(jnp.int32)
  new_end = new_offset + jnp.where(kept | fresh, sizes, 0)
  shift = new_offset - old_offset

  def body(k, bufs):
    # Chunks 0 .. n-1 ascending (leaves moving towards the start), then
    # n-1 .. 0 (leaves moving towards the end).
    second = k >= num_chunks
    k = jnp.where(second, 2 * num_chunks - 1 - k, k)
    position = k * chunk + jnp.arange(chunk, dtype=jnp.int32)
    # The last leaf starting at or before the position; unselected leaves
    # have empty windows, so `inside` rules them out.
    leaf = jnp.clip(
        jnp.searchsorted(new_offset, position, side="right") - 1, 0,
        num_leaves - 1)
    inside = position < new_end[leaf]
    moving = kept[leaf] & jnp.where(second, shift[leaf] > 0, shift[leaf] < 0)
    source = jnp.where(inside & moving, position - shift[leaf], position)
    # Fresh leaves are zeroed in the second pass: by then every kept leaf
    # before them has left their new window, and every kept leaf after
    # them is already in its own.
    clear = inside & fresh[leaf] & second
    # Positions past the end (last chunk) are read clamped and dropped.
    return tuple(
        b.at[position].set(
            jnp.where(clear, 0, b.at[source].get(mode="clip")), mode="drop")
        for b in bufs)

  buffers = counted_loop(2 * num_chunks, body, buffers)
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
