"""Static description of which parameter leaves an optimizer may train.

Everything here is computed from the *structure* of a pytree (paths, shapes,
dtypes), never from values, so it is identical in ``init`` and in every
traced ``update`` and never causes a recompilation.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

# Path components that name embeddings or output heads: LLaMA/HF
# (``embed_tokens``, ``lm_head``), GPT-2 (``wte``, ``wpe``), T5 (``shared``),
# Flax ``nn.Embed`` modules (``Embed_0``), and plain ``head``/``unembed``.
DEFAULT_INELIGIBLE_PATTERN = re.compile(
    r"(embed|^wte$|^wpe$|^lm_head$|^head$|^output_head$|^shared$)",
    re.IGNORECASE,
)

Eligible = Union[None, Callable[[tuple, Any], bool], Any]

_INT32_MAX = int(np.iinfo(np.int32).max)


def path_to_str(path) -> str:
  """Turns a ``jax.tree_util`` key path into ``'a/b/0/kernel'``."""
  return "/".join(_key_name(k) for k in path)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def default_eligible(path, leaf) -> bool:
  """Default rule: every float leaf except embeddings and output heads.

  A leaf is excluded when any component of its path matches
  :data:`DEFAULT_INELIGIBLE_PATTERN` (case-insensitive), e.g.
  ``model/embed_tokens/embedding``, ``lm_head/kernel``, ``transformer/wte``.
  """
  del leaf
  return not any(DEFAULT_INELIGIBLE_PATTERN.search(_key_name(k)) for k in path)


def is_float_leaf(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.floating)


class LeafLayout(NamedTuple):
  """Static layout of a parameter tree (Python values, not arrays).

  Attributes:
    treedef: structure of the tree.
    paths: ``'a/b/kernel'`` string of every leaf, in flattening order.
    eligible_index: flat position of each eligible leaf, ascending.
    shapes: shape of each eligible leaf.
    dtypes: dtype of each eligible leaf.
    sizes: number of coordinates of each eligible leaf.
  """

  treedef: Any
  paths: tuple
  eligible_index: tuple
  shapes: tuple
  dtypes: tuple
  sizes: tuple

  @property
  def num_eligible(self) -> int:
    return len(self.eligible_index)

  @property
  def num_candidate_coordinates(self) -> int:
    return int(sum(self.sizes))

  def eligible_leaves(self, tree) -> list:
    """The eligible leaves of ``tree`` (same structure), in layout order."""
    flat = self.treedef.flatten_up_to(tree)
    return [flat[i] for i in self.eligible_index]

  def updates_tree(self, tree, eligible_updates):
    """``tree``'s structure with ``eligible_updates`` at the eligible leaves
    and zeros (like ``tree``'s leaves) everywhere else."""
    flat = [jnp.zeros_like(leaf) for leaf in self.treedef.flatten_up_to(tree)]
    for i, update in zip(self.eligible_index, eligible_updates, strict=True):
      flat[i] = update
    return self.treedef.unflatten(flat)


def _mask_leaves(eligible, tree, treedef, name: str = "eligible") -> list:
  """Flattens a user mask pytree to one bool per leaf of ``tree``."""
  try:
    mask_leaves = treedef.flatten_up_to(eligible)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"`{name}` must be None, a predicate `(path, leaf) -> bool`, or a "
        "pytree of bools with the same structure as the parameters; the mask "
        f"does not match the parameter tree: {err}"
    ) from None
  return [bool(m) for m in mask_leaves]


def build_layout(tree, eligible: Eligible = None) -> LeafLayout:
  """Computes the static layout of ``tree`` under the ``eligible`` rule.

  Args:
    tree: parameters, gradients or ``jax.ShapeDtypeStruct`` leaves.
    eligible: ``None`` (default rule, see :func:`default_eligible`), a
      predicate ``(path, leaf) -> bool``, or a pytree of bools shaped like
      ``tree``. Non-float leaves are never eligible.

  Returns:
    A :class:`LeafLayout`.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = tuple(path_to_str(p) for p, _ in path_leaves)
  if eligible is None or callable(eligible):
    predicate = default_eligible if eligible is None else eligible
    allowed = [bool(predicate(p, leaf)) for p, leaf in path_leaves]
  else:
    allowed = _mask_leaves(eligible, tree, treedef)
  eligible_index, shapes, dtypes, sizes = [], [], [], []
  for i, ((_, leaf), ok) in enumerate(zip(path_leaves, allowed)):
    if ok and is_float_leaf(leaf):
      size = int(np.prod(leaf.shape, dtype=np.int64))
      if size == 0:
        continue
      if size > _INT32_MAX:
        raise ValueError(
            f"Leaf {paths[i]!r} has {size} coordinates; at most {_INT32_MAX} "
            "per leaf are supported (int32 offsets)."
        )
      eligible_index.append(i)
      shapes.append(tuple(leaf.shape))
      dtypes.append(jnp.dtype(leaf.dtype))
      sizes.append(size)
  return LeafLayout(
      treedef=treedef,
      paths=paths,
      eligible_index=tuple(eligible_index),
      shapes=tuple(shapes),
      dtypes=tuple(dtypes),
      sizes=tuple(sizes),
  )


def require_eligible(layout: LeafLayout, eligible: Eligible) -> None:
  """Raises a ``ValueError`` for a non-empty tree with nothing to train."""
  if layout.paths and not layout.eligible_index:
    rule = "the default rule (no embeddings / heads)" if eligible is None else (
        "the given `eligible` rule")
    raise ValueError(
        "`eligible` selects no float leaf with at least one coordinate: "
        f"{rule} excluded all of {list(layout.paths)[:8]}"
        f"{' ...' if len(layout.paths) > 8 else ''}. Pass `eligible=` a "
        "predicate or mask that admits at least one float parameter."
    )
