"""The compact-buffer engine against pure-NumPy models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blockllm_jax import _compact


def numpy_greedy_fill(scores, sizes, capacity):
  """Reference: take leaves by descending score (ties: lower index) if they fit."""
  order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
  used, chosen = 0, np.zeros(len(scores), bool)
  for i in order:
    if used + sizes[i] <= capacity:
      chosen[i] = True
      used += sizes[i]
  return chosen


@pytest.mark.parametrize("seed", range(6))
def test_greedy_fill_matches_numpy(seed):
  rng = np.random.default_rng(seed)
  num = int(rng.integers(1, 30))
  sizes = rng.integers(1, 50, num)
  # Repeated scores exercise the tie rule.
  scores = rng.choice([0.5, 1.0, 2.0, 3.0], num) * rng.uniform(0.5, 1.5)
  capacity = int(rng.integers(int(sizes.max()), int(sizes.sum()) + 1))
  got = jax.jit(_compact.greedy_fill, static_argnums=2)(
      jnp.asarray(scores, jnp.float32), jnp.asarray(sizes, jnp.int32), capacity)
  want = numpy_greedy_fill(scores.astype(np.float32), sizes, capacity)
  np.testing.assert_array_equal(np.asarray(got), want)
  # Exact fill: no unselected leaf fits into the remaining room.
  room = capacity - sizes[want].sum()
  assert room >= 0
  assert not np.any(sizes[~want] <= room)


def test_packed_offsets():
  sizes = jnp.array([3, 5, 2, 4], jnp.int32)
  selected = jnp.array([True, False, True, True])
  np.testing.assert_array_equal(
      _compact.packed_offsets(selected, sizes), [0, 3, 3, 5])


def _numpy_repack_case(rng, sizes):
  """(args of ``repack``, what it must leave in each new window)."""
  num, sizes = len(sizes), np.asarray(sizes)
  capacity = int(sizes.sum() * 0.6) + int(sizes.max())
  old = numpy_greedy_fill(rng.uniform(size=num), sizes, capacity)
  new = numpy_greedy_fill(rng.uniform(size=num), sizes, capacity)
  old_off = np.concatenate([[0], np.cumsum(np.where(old, sizes, 0))[:-1]])
  new_off = np.concatenate([[0], np.cumsum(np.where(new, sizes, 0))[:-1]])
  buffer = rng.normal(size=capacity).astype(np.float32)
  # NumPy model: a fresh buffer, kept leaves copied from their old windows.
  want = np.zeros(capacity, np.float32)
  for i in range(num):
    if old[i] and new[i]:
      want[new_off[i]:new_off[i] + sizes[i]] = buffer[old_off[i]:old_off[i] +
                                                       sizes[i]]
  args = (jnp.asarray(buffer), tuple(int(s) for s in sizes),
          jnp.asarray(old_off, jnp.int32), jnp.asarray(new_off, jnp.int32),
          jnp.asarray(old & new), jnp.asarray(new & ~old))
  windows = [(new_off[i], sizes[i]) for i in range(num) if new[i]]
  return args, want, windows


_repack = jax.jit(_compact.repack, static_argnums=1,
                  static_argnames="chunk")


def _assert_repacked(got, want, windows):
  got = np.asarray(got)
  for start, size in windows:
    np.testing.assert_array_equal(got[start:start + size],
                                  want[start:start + size])


@pytest.mark.parametrize("seed", range(8))
def test_repack_moves_kept_leaves_and_zeroes_fresh_ones(seed):
  rng = np.random.default_rng(seed)
  args, want, windows = _numpy_repack_case(rng, rng.integers(1, 9, 12))
  _assert_repacked(_repack(*args), want, windows)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 1000])
@pytest.mark.parametrize("seed", range(3))
def test_repack_in_chunks_matches_numpy(seed, chunk):
  # Chunks that do not divide the capacity (a partial last chunk), chunks
  # smaller than a leaf, and one chunk for the whole buffer.
  rng = np.random.default_rng(100 + seed)
  args, want, windows = _numpy_repack_case(rng, rng.integers(1, 9, 20))
  _assert_repacked(_repack(*args, chunk=chunk), want, windows)


def test_repack_program_does_not_grow_with_the_leaves():
  rng = np.random.default_rng(7)
  lines = []
  for num in (8, 64):
    args, _, _ = _numpy_repack_case(rng, rng.integers(1, 9, num))
    args = (jnp.zeros([64], jnp.float32),) + args[1:]
    text = _repack.lower(*args, chunk=16).compile().as_text()
    lines.append(len(text.splitlines()))
  # 8x the leaves: the same loops (a binary search one step deeper).
  assert lines[1] < 1.03 * lines[0], lines


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 1.0])
def test_keep_top_fraction(fraction):
  rng = np.random.default_rng(0)
  direction = rng.normal(size=40).astype(np.float32)
  got = np.asarray(_compact.keep_top_fraction(jnp.asarray(direction), fraction))
  k = int(np.ceil(fraction * 40))
  keep = np.argsort(-np.abs(direction))[:k]
  want = np.zeros_like(direction)
  want[keep] = direction[keep]
  np.testing.assert_array_equal(got, want)
