"""Static description of which parameter leaves an optimizer may train.

Everything here is computed from the *structure* of a pytree (paths, shapes,
dtypes), never from values, so it is identical in ``init`` and in every
traced ``update`` and never causes a recompilation.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


class LayerKey(jax.tree_util.SequenceKey):
  """The key that names one layer of a stacked leaf in a unit's path.

  Block rules (``badam(blocks=...)``) see a stacked leaf's layer ``i`` as
  the leaf's path followed by ``LayerKey(i)``.
  """


class LeafLayout(NamedTuple):
  """Static layout of a parameter tree in *units* (Python values).

  A unit is an eligible leaf, or one layer's slice of an eligible leaf that
  stacks layers along an axis (``layer_axis``). Optimizers score, select
  and keep moments per unit.

  Attributes:
    treedef: structure of the tree.
    paths: ``'a/b/kernel'`` string of every leaf, in flattening order.
    eligible_index: flat position of each unit's leaf, ascending (the units
      of a stacked leaf are consecutive, in layer order).
    shapes: shape of each unit (a stacked leaf's shape without its axis).
    dtypes: dtype of each unit.
    sizes: number of coordinates of each unit.
    unit_layer: each unit's layer in its stacked leaf, or -1 (unstacked).
    layer_axes: per leaf (flattening order), its layer axis or None.
    layer_counts: per leaf, its number of layers if stacked, else None.
  """

  treedef: Any
  paths: tuple
  eligible_index: tuple
  shapes: tuple
  dtypes: tuple
  sizes: tuple
  unit_layer: tuple = ()
  layer_axes: tuple = ()
  layer_counts: tuple = ()  # per leaf: layers of a stacked leaf, or None

  @property
  def num_eligible(self) -> int:
    return len(self.eligible_index)

  @property
  def num_candidate_coordinates(self) -> int:
    return int(sum(self.sizes))

  @property
  def stacked(self) -> bool:
    """Whether any unit is one layer of a stacked leaf."""
    return any(layer >= 0 for layer in self.unit_layer)

  def unit_path(self, unit: int) -> str:
    """``'a/b/kernel'``, or ``'a/b/kernel[3]'`` for layer 3 of a stack."""
    path = self.paths[self.eligible_index[unit]]
    layer = self.unit_layer[unit] if self.unit_layer else -1
    return path if layer < 0 else f"{path}[{layer}]"

  def eligible_leaves(self, tree) -> list:
    """Each unit's part of ``tree`` (same structure), in layout order: the
    leaf, or its layer's slice (a static slice XLA fuses into its users)."""
    flat = self.treedef.flatten_up_to(tree)
    out = []
    for unit, position in enumerate(self.eligible_index):
      layer = self.unit_layer[unit] if self.unit_layer else -1
      leaf = flat[position]
      if layer >= 0:
        leaf = lax.index_in_dim(leaf, layer, self.layer_axes[position],
                                keepdims=False)
      out.append(leaf)
    return out

  def num_layers(self, group: "UnitGroup") -> int:
    """Layers of a stacked group's leaf."""
    return self.layer_counts[group.position]

  def whole_stack(self, group: "UnitGroup") -> bool:
    """Whether a stacked group's units are all its leaf's layers, in order."""
    return group.layers == tuple(range(self.num_layers(group)))

  def groups(self) -> tuple:
    """The units as :class:`UnitGroup` s: each stacked leaf's units (which
    are consecutive) form one group, every other unit a group of its own."""
    return _groups(self)

  def group_leaves(self, tree) -> list:
    """One array per :meth:`groups` entry: the unit's leaf, or the whole
    stacked leaf of a group of layers."""
    flat = self.treedef.flatten_up_to(tree)
    return [flat[group.position] for group in self.groups()]

  def unit_reduce(self, tree, reduce) -> jax.Array:
    """``[U]``: ``reduce(x, axes)`` of each unit's part of ``tree``.

    ``reduce`` reduces ``x`` over ``axes`` (None: all). A stacked leaf is
    reduced once over every axis but its layer axis, so the program does
    not grow with the number of layers.
    """
    parts = []
    for group, leaf in zip(self.groups(), self.group_leaves(tree)):
      if group.axis is None:
        parts.append(jnp.reshape(reduce(leaf, None), [1]))
      else:
        axes = tuple(i for i in range(leaf.ndim) if i != group.axis)
        per_layer = reduce(leaf, axes)
        parts.append(per_layer if self.whole_stack(group)
                     else per_layer[np.asarray(group.layers)])
    if not parts:
      return jnp.zeros([0], jnp.float32)
    return jnp.concatenate(parts)

  def updates_tree(self, tree, group_updates):
    """``tree``'s structure with one update per :meth:`groups` entry (a
    stacked group's update is the whole stacked leaf) and zeros elsewhere."""
    flat = list(self.treedef.flatten_up_to(tree))
    given = {group.position: update for group, update
             in zip(self.groups(), group_updates, strict=True)}
    return self.treedef.unflatten(
        [given[i] if i in given else jnp.zeros_like(leaf)
         for i, leaf in enumerate(flat)])

  def subset(self, units) -> "LeafLayout":
    """The layout of the listed units only (ascending positions)."""
    units = list(units)
    pick = lambda values: tuple(values[u] for u in units)
    return self._replace(
        eligible_index=pick(self.eligible_index), shapes=pick(self.shapes),
        dtypes=pick(self.dtypes), sizes=pick(self.sizes),
        unit_layer=pick(self.unit_layer))


class UnitGroup(NamedTuple):
  """Consecutive units processed together (static).

  Attributes:
    start, stop: the units ``start .. stop - 1``.
    position: flat position of their leaf.
    axis: the leaf's layer axis, or None for a single unstacked unit.
    layers: each unit's layer (``()`` for an unstacked unit).
  """

  start: int
  stop: int
  position: int
  axis: Any
  layers: tuple


@functools.lru_cache(maxsize=64)
def _groups(layout: "LeafLayout") -> tuple:
  groups = []
  unit = 0
  num = len(layout.eligible_index)
  while unit < num:
    position = layout.eligible_index[unit]
    layer = layout.unit_layer[unit] if layout.unit_layer else -1
    if layer < 0:
      groups.append(UnitGroup(unit, unit + 1, position, None, ()))
      unit += 1
      continue
    stop = unit
    while stop < num and layout.eligible_index[stop] == position:
      stop += 1
    groups.append(UnitGroup(unit, stop, position, layout.layer_axes[position],
                            tuple(layout.unit_layer[unit:stop])))
    unit = stop
  return tuple(groups)


# How a leaf stacks layers: None, an axis for every leaf under a layer stack,
# a pytree of axes, or a rule ``(path, leaf) -> axis | None``.
LayerAxis = Union[None, int, Callable[[tuple, Any], Any], Any]

# A path component that names a stack of layers (``nn.scan`` over a module
# named ``layers``; MaxText's ``decoder/layers``; Levanter's ``layers``).
LAYER_STACK_PATTERN = re.compile(r"^(?:layers?|h|blocks?|stack)$",
                                 re.IGNORECASE)


def _under_layer_stack(path) -> bool:
  return any(LAYER_STACK_PATTERN.match(_key_name(k)) for k in path)


def resolve_layer_axes(tree, layer_axis: LayerAxis) -> tuple:
  """One layer axis (non-negative int) or None per leaf of ``tree``.

  Args:
    tree: parameters, gradients or ``jax.ShapeDtypeStruct`` leaves.
    layer_axis: ``None`` (nothing stacked); an int, for every float leaf
      with a path component named like a layer stack (``layers``,
      ``layer``, ``h``, ``blocks``, ``block``, ``stack``); a pytree like
      ``tree`` of ``int | None``; or a callable ``(path, leaf) -> int |
      None``.

  Raises:
    ValueError: naming ``layer_axis``: an axis out of range, stacked leaves
      that disagree on the number of layers, a mask that does not match the
      tree, or an int that matches no leaf.
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  if layer_axis is None:
    return (None,) * len(path_leaves)
  if isinstance(layer_axis, (bool, np.bool_)):
    raise ValueError(
        f"`layer_axis` must be None, an int, a pytree of `int | None` or a "
        f"callable; got {layer_axis!r}.")
  if isinstance(layer_axis, (int, np.integer)):
    axes = [int(layer_axis) if is_float_leaf(leaf) and _under_layer_stack(p)
            else None for p, leaf in path_leaves]
    if not any(a is not None for a in axes):
      raise ValueError(
          f"`layer_axis={layer_axis}` applies to leaves under a layer stack "
          "(a path component named `layers`, `layer`, `h`, `blocks`, "
          "`block` or `stack`), and this tree has none; pass a pytree of "
          "axes or a callable `(path, leaf) -> int | None`.")
  elif callable(layer_axis):
    axes = [layer_axis(p, leaf) for p, leaf in path_leaves]
  else:
    try:
      axes = treedef.flatten_up_to(layer_axis)
    except (ValueError, TypeError) as err:
      raise ValueError(
          "`layer_axis` must be None, an int, a callable, or a pytree of "
          f"`int | None` with the parameters' structure: {err}") from None
  resolved, counts = [], {}
  for (path, leaf), axis in zip(path_leaves, axes):
    if axis is None or not is_float_leaf(leaf):
      resolved.append(None)
      continue
    name = path_to_str(path)
    ndim = len(leaf.shape)
    if (isinstance(axis, (bool, np.bool_))
        or not isinstance(axis, (int, np.integer))
        or not -ndim <= int(axis) < ndim):
      raise ValueError(
          f"`layer_axis` for {name!r} (shape {tuple(leaf.shape)}) must be an "
          f"int in [{-ndim}, {ndim}) or None; got {axis!r}.")
    axis = int(axis) % ndim
    counts[name] = int(leaf.shape[axis])
    resolved.append(axis)
  if len(set(counts.values())) > 1:
    listed = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:6])
    raise ValueError(
        "`layer_axis`: stacked leaves disagree on the number of layers "
        f"({listed}); every stacked leaf must hold the same layers.")
  return tuple(resolved)


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


def check_sharded_layers(layout: LeafLayout, plan) -> None:
  """On a mesh (``plan``: a ``_sharding.MeshPlan``, or None) a stacked leaf
  must keep its layer axis whole on every device: each device then holds
  its shard of every layer's unit, as it does of every unstacked leaf."""
  if plan is None:
    return
  for position, axis in enumerate(layout.layer_axes):
    if axis is None:
      continue
    spec = tuple(plan.specs[position])
    if axis < len(spec) and spec[axis] is not None:
      raise ValueError(
          f"`layer_axis`: {layout.paths[position]} stacks its layers on axis "
          f"{axis}, which `param_sharding` splits over {spec[axis]!r}; keep "
          "the layer axis unsharded (each device then holds its shard of "
          "every layer) or pass `layer_axis=None`.")


def build_layout(tree, eligible: Eligible = None,
                 layer_axis: LayerAxis = None) -> LeafLayout:
  """Computes the static layout of ``tree`` under the ``eligible`` rule.

  Args:
    tree: parameters, gradients or ``jax.ShapeDtypeStruct`` leaves.
    eligible: ``None`` (default rule, see :func:`default_eligible`), a
      predicate ``(path, leaf) -> bool``, or a pytree of bools shaped like
      ``tree``. Non-float leaves are never eligible.
    layer_axis: how leaves stack layers (:func:`resolve_layer_axes`); an
      eligible stacked leaf gives one unit per layer.

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
  layer_axes = resolve_layer_axes(tree, layer_axis)
  eligible_index, shapes, dtypes, sizes, unit_layer = [], [], [], [], []
  for i, ((_, leaf), ok) in enumerate(zip(path_leaves, allowed)):
    if ok and is_float_leaf(leaf):
      axis = layer_axes[i]
      shape = tuple(leaf.shape)
      layers = [-1]
      if axis is not None:
        layers = list(range(shape[axis]))
        shape = shape[:axis] + shape[axis + 1:]
      size = int(np.prod(shape, dtype=np.int64))
      if size == 0:
        continue
      if size > _INT32_MAX:
        raise ValueError(
            f"Leaf {paths[i]!r} has {size} coordinates; at most {_INT32_MAX} "
            "per leaf are supported (int32 offsets)."
        )
      for layer in layers:
        eligible_index.append(i)
        shapes.append(shape)
        dtypes.append(jnp.dtype(leaf.dtype))
        sizes.append(size)
        unit_layer.append(layer)
  return LeafLayout(
      treedef=treedef,
      paths=paths,
      eligible_index=tuple(eligible_index),
      shapes=tuple(shapes),
      dtypes=tuple(dtypes),
      sizes=tuple(sizes),
      unit_layer=tuple(unit_layer),
      layer_axes=layer_axes,
      layer_counts=tuple(None if axis is None else int(leaf.shape[axis])
                         for (_, leaf), axis in zip(path_leaves, layer_axes)),
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
