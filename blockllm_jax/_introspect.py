"""Introspection: what is selected, how often the selection changed.

These functions accept the state of the transformation itself or any state
that contains it (``optax.chain``, ``optax.inject_hyperparams``,
``optax.apply_if_finite``, ...).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_STATE_TYPES: list = []


def register_state_type(state_type) -> None:
  """Makes a state class findable; it needs ``selected``, ``leaf_index``,
  ``unit_layer`` and ``selection_count`` fields."""
  _STATE_TYPES.append(state_type)


def find_state(opt_state):
  """Returns the single block-optimizer state inside ``opt_state``."""
  types = tuple(_STATE_TYPES)
  found = [
      leaf for leaf in jax.tree_util.tree_leaves(
          opt_state, is_leaf=lambda x: isinstance(x, types))
      if isinstance(leaf, types)
  ]
  if len(found) != 1:
    raise ValueError(
        "Expected exactly one blockllm_jax optimizer state inside `state`, "
        f"found {len(found)}. Pass the state returned by `tx.init` / "
        "`tx.update` of a transformation that contains one.")
  return found[0]


def selected(state, params) -> Any:
  """Which leaves (or layers of stacked leaves) are currently selected.

  Args:
    state: the optimizer state (or a chain / wrapper state containing it).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``) the state
      was initialised for.

  Returns:
    A pytree like ``params``: a bool scalar array per leaf, True iff the
    leaf is in the current selection (always False for ineligible leaves
    and before the first update); for a leaf that stacks layers
    (``layer_axis``), a bool array of shape ``(layers,)``, one per layer.
    Inside ``jit`` (a traced state) a stacked leaf gives one bool: any of
    its layers.

  Example:
    >>> mask = blockllm_jax.selected(opt_state, params)
    >>> jax.tree.map(bool, mask)
  """
  inner = find_state(state)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  try:
    index = np.asarray(inner.leaf_index)
    layer = np.asarray(inner.unit_layer)
  except jax.errors.TracerArrayConversionError:
    index = layer = None
  if index is not None and (layer >= 0).any():
    num_layers = int(layer.max()) + 1
    out = []
    for position in range(len(leaves)):
      units = np.flatnonzero(index == position)
      if units.size and (layer[units] >= 0).all():
        out.append(jnp.zeros([num_layers], bool).at[layer[units]].set(
            inner.selected[units]))
      else:
        out.append(jnp.any(inner.selected[units]) if units.size
                   else jnp.zeros([], bool))
    return jax.tree_util.tree_unflatten(treedef, out)
  positions = jnp.arange(len(leaves), dtype=jnp.int32)
  # One bool per param leaf: does any selected eligible entry point at it?
  hits = (inner.leaf_index[None, :] == positions[:, None]) & inner.selected
  per_leaf = jnp.any(hits, axis=1) if inner.selected.size else jnp.zeros(
      [len(leaves)], bool)
  return jax.tree_util.tree_unflatten(
      treedef, [per_leaf[i] for i in range(len(leaves))])


def reselection_count(state) -> jax.Array:
  """Number of selections made so far, the first one included (int32)."""
  return find_state(state).selection_count


def active_block(state) -> jax.Array:
  """Position of the block BAdam / BREAD trained at the last step (int32).

  -1 before the first step. Positions index the blocks in ascending order,
  as :func:`blockllm_jax.block_partition` lists them.
  """
  inner = find_state(state)
  if not hasattr(inner, "active_block"):
    raise ValueError("`state` holds a BlockLLM state, which selects leaves, "
                     "not blocks; use `blockllm_jax.selected`.")
  return inner.active_block
