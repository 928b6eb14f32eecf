"""The engine's building blocks, against hand-computed values."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from blockllm_jax import _engine


def test_split_matrix_rows_are_exact():
  ints = jnp.asarray([[1, -2, 2**31 - 1], [0, 7, -(2**31)]], jnp.int32)
  for got, want in zip(_engine.split_matrix(ints), np.asarray(ints)):
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)
  # As int32 bits, every float comes back bit for bit (-0.0, NaN, Inf too).
  floats = jnp.asarray([[-0.0, jnp.nan, jnp.inf], [1e-45, -3.5, 2.0**100]],
                       jnp.float32)
  rows = jax.jit(_engine.split_matrix)(floats)
  for got, want in zip(rows, np.asarray(floats)):
    np.testing.assert_array_equal(np.asarray(got).view(np.int32),
                                  want.view(np.int32))
  # Summed as floats, whole numbers >= 0 (the lean control rows) are exact.
  whole = jnp.asarray([[0.0, 1.0, 4095.0], [1.0, 0.0, 2.0**23 + 1]])
  rows = jax.jit(lambda m: _engine.split_matrix(m, as_bits=False))(whole)
  for got, want in zip(rows, np.asarray(whole)):
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(got, want)


def test_split_matrix_in_chunks_is_exact_at_depth():
  # 219 rows: the units of a 24-layer LLaMA; more rows than one reduction
  # may have outputs (XLA:GPU's shared memory), and not a multiple of it.
  n = 219
  matrix = (jnp.arange(n * 6, dtype=jnp.int32).reshape(n, 6) * 7919
            - 2**30)
  split = jax.jit(_engine.split_matrix)
  rows = split(matrix)
  assert len(rows) == n
  for got, want in zip(rows, np.asarray(matrix)):
    np.testing.assert_array_equal(got, want)
  # Each reduction of the compiled program has at most _SPLIT_CHUNK outputs.
  outputs = [int(k) for k in re.findall(r"%\w+:(\d+) = stablehlo\.reduce",
                                         split.lower(matrix).as_text())]
  assert max(outputs) <= _engine._SPLIT_CHUNK
  # Two stages: one reduction over the position in each group of 15 rows
  # (the square root of 219, rounded up), then one per position, the same
  # kernel, instead of one per chunk of rows.
  assert sorted(outputs) == [15] * 16


def test_split_matrix_recurses_beyond_a_chunk_of_chunks(monkeypatch):
  # With 4 outputs per reduction, 70 rows are 18 groups of 4: the second
  # stage splits in two stages again.
  monkeypatch.setattr(_engine, "_SPLIT_CHUNK", 4)
  matrix = jnp.arange(70 * 3, dtype=jnp.float32).reshape(70, 3) - 100.5
  split = jax.jit(_engine.split_matrix)
  rows = split(matrix)
  assert len(rows) == 70
  for got, want in zip(rows, np.asarray(matrix)):
    np.testing.assert_array_equal(got, want)
  outputs = [int(k) for k in re.findall(r"%\w+:(\d+) = stablehlo\.reduce",
                                         split.lower(matrix).as_text())]
  assert max(outputs) <= 4


def test_split_rows_mixes_ints_and_floats():
  offsets = jnp.asarray([0, 4096, 2**30], jnp.int32)
  scales = jnp.asarray([1.0, 10.000001, 1e-30], jnp.float32)
  rows = _engine.split_rows([scales, offsets])
  assert len(rows) == 3
  for i, (scale, offset) in enumerate(rows):
    assert scale.dtype == jnp.float32 and offset.dtype == jnp.int32
    assert scale.shape == offset.shape == ()
    np.testing.assert_array_equal(scale, scales[i])
    assert int(offset) == int(offsets[i])
  assert _engine.split_rows([jnp.zeros([0], jnp.int32)]) == []


def _finite_reference(layout, tree):
  """NumPy: every unit's part of the tree is finite, and so are its squares
  in float32 (Adam's second moment)."""
  flat = jax.tree.leaves(tree)
  for position, layer in zip(layout.eligible_index, layout.unit_layer):
    leaf = np.asarray(flat[position], np.float32)
    if layer >= 0:
      leaf = np.take(leaf, layer, axis=layout.layer_axes[position])
    with np.errstate(over="ignore", invalid="ignore"):
      if not np.all(np.isfinite(np.square(leaf))):
        return False
  return True


def test_all_finite_matches_each_unit_checked_alone():
  from blockllm_jax import _layout
  tree = {
      # Three same-shaped leaves (combined in one kernel), one of another
      # shape, a bfloat16 one, and a stack of three layers on axis 1.
      "a": jnp.ones((4, 3)), "b": jnp.ones((4, 3)), "c": jnp.ones((4, 3)),
      "d": jnp.ones(5), "e": jnp.ones((2, 2), jnp.bfloat16),
      "layers": {"w": jnp.ones((2, 3, 4))},
  }
  layer_axis = lambda path, leaf: 1 if "layers" in path[0].key else None
  full = _layout.build_layout(tree, lambda p, x: True, layer_axis)
  # Units a, c and the first two of the three layers: a stack partly present.
  partial = full.subset([0, 2, 5, 6])
  assert [g.layers for g in partial.groups()
          if g.axis is not None] == [(0, 1)]
  check = jax.jit(_engine.all_finite, static_argnums=0)
  places = [("a", (1, 2)), ("b", (0, 0)), ("c", (3, 1)), ("d", (4,)),
            ("e", (1, 0)), ("layers", (0, 0, 3)), ("layers", (1, 1, 0)),
            ("layers", (0, 2, 2))]
  for layout in (full, partial):
    assert check(layout, tree)
    for key, index in places:
      # 1e19 squares to 1e38 (fits float32); 2e19 does not.
      for value in (jnp.nan, jnp.inf, -jnp.inf, 2e19, -2e19, 1e19):
        broken = jax.tree.map(lambda x: x, tree)
        if key == "layers":
          broken["layers"]["w"] = tree["layers"]["w"].at[index].set(value)
        else:
          broken[key] = tree[key].at[index].set(value)
        want = _finite_reference(layout, broken)
        assert bool(check(layout, broken)) == want, (key, index, value)
        # and as the per-unit check says
        assert want == bool(jnp.all(_engine.finite_units(layout, broken)))
