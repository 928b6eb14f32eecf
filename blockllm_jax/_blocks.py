"""Blocks of parameter leaves and the order in which BAdam visits them.

A *block rule* maps every leaf ``(path, leaf)`` to a block id (an ``int`` or
a ``str``) or to ``None`` (the leaf is never trained). Blocks are numbered by
*position*: ids sorted with ints first, ascending, then strings in natural
order (``"b2" < "b10"``). Position 0 is the input end of the network for the
default rule (embedding ``-1``, layers ``0 .. n-1``, head ``"head"``), so
"ascending" means input to output and the BREAD scope "partial" means "the
positions after the active one".

The schedule is a pure function of the number of finite steps taken ``t``,
the switch period ``K`` and, for the random order, a PRNG key: block slot
``t // K`` of pass ``t // (K * B)`` is trained for exactly ``K`` steps.
Everything here about the tree is static (Python values); only the schedule
runs inside ``jit``.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from blockllm_jax import _layout

BlockId = Union[int, str]
BlockRule = Callable[[tuple, Any], Optional[BlockId]]
LeafMask = Union[None, Callable[[tuple, Any], bool], Any]

ORDERS = ("ascending", "descending", "random")

# Output heads first (``unembed`` also contains "embed"), then embeddings.
# Together they match what ``_layout.DEFAULT_INELIGIBLE_PATTERN`` excludes.
HEAD_PATTERN = re.compile(r"(^lm_head$|^head$|^output_head$|unembed)",
                          re.IGNORECASE)
EMBEDDING_PATTERN = re.compile(r"(embed|^wte$|^wpe$|^shared$)", re.IGNORECASE)
# A transformer layer: one path component ``layers_3`` / ``layer.3`` /
# ``block3`` / ``h_3``, or a container ``layers`` / ``h`` / ``block`` followed
# by an index component (lists, HF Flax GPT-2's ``h/3``).
LAYER_PATTERN = re.compile(r"^(?:layers?|h|blocks?)[_.\-]?(\d+)$",
                           re.IGNORECASE)
LAYER_CONTAINER_PATTERN = re.compile(r"^(?:layers?|h|blocks?)$", re.IGNORECASE)

# Roles of a leaf in a partition.
BLOCK, ALWAYS_ACTIVE, ADAPTER = 0, 1, 2


def layer_index(path) -> Optional[int]:
  """The transformer-layer index named in ``path``, or None.

  A :class:`~blockllm_jax._layout.LayerKey` (layer ``i`` of a stacked leaf,
  see ``layer_axis``) gives it; otherwise the first component that matches
  :data:`LAYER_PATTERN` (``layers_3``, ``block3``, ``h_3``, ...) or an
  integer component right after a ``layers`` / ``layer`` / ``h`` /
  ``blocks`` / ``block`` component.
  """
  for key in path:
    if isinstance(key, _layout.LayerKey):  # a layer of a stacked leaf
      return int(key.idx)
  names = [_layout._key_name(k) for k in path]
  for i, name in enumerate(names):
    match = LAYER_PATTERN.match(name)
    if match:
      return int(match.group(1))
    if (LAYER_CONTAINER_PATTERN.match(name) and i + 1 < len(names)
        and names[i + 1].isdigit()):
      return int(names[i + 1])
  return None


def layer_blocks(layers_per_block: int = 1, *, include_embedding: bool = False,
                 include_head: bool = False) -> BlockRule:
  """The default block rule: one block per transformer layer (or per group).

  Rule, per leaf path, first match wins:

  1. a component matching :data:`HEAD_PATTERN` (``lm_head``, ``head``, ...):
     block ``"head"`` if ``include_head`` else None;
  2. a component matching :data:`EMBEDDING_PATTERN` (``embed*``, ``wte``,
     ``wpe``, ``shared``): block ``-1`` if ``include_embedding`` else None;
  3. a layer index ``i`` (see :func:`layer_index`): block
     ``i // layers_per_block``;
  4. anything else (e.g. the final norm ``model/norm/weight``): block
     ``"head"`` if ``include_head`` else None, as in the original code,
     which puts "lm_head and others" in one block.

  Ids sort as ``-1 < 0 < 1 < ... < "head"``, i.e. from input to output.
  A model with several stacks of layers (encoder-decoder) needs its own rule,
  since both stacks' layer ``i`` would land in block ``i``.

  Args:
    layers_per_block: consecutive layers per block (>= 1).
    include_embedding: make the input embedding a block of its own.
    include_head: make the output head (and the leaves outside every layer,
      such as the final norm) a block of its own.

  Returns:
    A rule ``(path, leaf) -> int | str | None``.

  Example:
    >>> rule = blockllm_jax.layer_blocks(2, include_head=True)
    >>> tx = blockllm_jax.badam(1e-5, blocks=rule)
  """
  layers_per_block = int(layers_per_block)

  def rule(path, leaf) -> Optional[BlockId]:
    del leaf
    names = [_layout._key_name(k) for k in path]
    if any(HEAD_PATTERN.search(n) for n in names):
      return "head" if include_head else None
    if any(EMBEDDING_PATTERN.search(n) for n in names):
      return -1 if include_embedding else None
    index = layer_index(path)
    if index is not None:
      return index // layers_per_block
    return "head" if include_head else None

  return rule


def _natural_key(block_id: BlockId):
  if isinstance(block_id, int):
    return (0, block_id, ())
  # Alternating text / number pieces: comparisons never mix types.
  pieces = re.split(r"(\d+)", block_id)
  return (1, 0, tuple(int(p) if i % 2 else p for i, p in enumerate(pieces)))


def _check_block_id(block_id, path: str) -> Optional[BlockId]:
  if block_id is None:
    return None
  if isinstance(block_id, (bool, np.bool_)):
    raise ValueError(f"The block rule `blocks` returned a bool for {path!r}; "
                     "block ids must be int or str (None: never trained).")
  if isinstance(block_id, numbers.Integral):
    return int(block_id)
  if isinstance(block_id, str):
    return block_id
  raise ValueError(
      f"The block rule `blocks` returned {block_id!r} for {path!r}; block ids "
      "must be int or str (None: never trained).")


def _leaf_flags(mask: LeafMask, name: str, path_leaves, tree, treedef) -> list:
  """One bool per leaf from None (all False), a predicate or a bool pytree."""
  if mask is None:
    return [False] * len(path_leaves)
  if callable(mask):
    return [bool(mask(p, leaf)) for p, leaf in path_leaves]
  return _layout._mask_leaves(mask, tree, treedef, name)


class BlockPartition(NamedTuple):
  """Static partition of a parameter tree into blocks (Python values).

  Attributes:
    layout: the :class:`~blockllm_jax._layout.LeafLayout` whose "eligible"
      leaves are those with a role (in a block, always active or adapter).
    block_ids: id of each block position, ascending (input to output).
    role: per layout leaf, ``BLOCK``, ``ALWAYS_ACTIVE`` or ``ADAPTER``.
    position: per layout leaf, its block position; ``-1`` for always-active
      leaves; for adapters the position of the block their path falls in,
      or ``num_blocks`` (the output end) if none.
  """

  layout: _layout.LeafLayout
  block_ids: tuple
  role: tuple
  position: tuple

  @property
  def num_blocks(self) -> int:
    return len(self.block_ids)

  def paths_of_block(self, pos: int) -> tuple:
    """Paths of the block's units (``'a/kernel[3]'`` for a stacked layer)."""
    return tuple(self.layout.unit_path(u)
                 for u, (r, p) in enumerate(zip(self.role, self.position))
                 if r == BLOCK and p == pos)


def build_partition(tree, rule: BlockRule, always_active: LeafMask = None,
                    adapters: Optional[Callable[[tuple], bool]] = None,
                    layer_axis: _layout.LayerAxis = None) -> BlockPartition:
  """Assigns every float unit of ``tree`` a role and a block position.

  Args:
    tree: parameters, gradients or ``jax.ShapeDtypeStruct`` leaves.
    rule: block rule ``(path, leaf) -> int | str | None``; layer ``i`` of a
      stacked leaf is asked as ``path + (LayerKey(i),)`` (the default
      :func:`layer_blocks` puts it in block ``i // layers_per_block``).
    always_active: leaves trained at every step (predicate or bool pytree);
      they leave their block.
    adapters: predicate on the key path marking adapter leaves (BREAD's LoRA
      correction); they leave their block and remember its position.
    layer_axis: how leaves stack layers (see
      :func:`blockllm_jax._layout.resolve_layer_axes`).

  Returns:
    A :class:`BlockPartition` (may have no blocks; the caller checks).
  """
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  always = _leaf_flags(always_active, "always_active", path_leaves, tree,
                       treedef)
  every_float = jax.tree_util.tree_unflatten(
      treedef, [True] * len(path_leaves))
  units = _layout.build_layout(tree, every_float, layer_axis)
  kinds, ids = [], []
  for unit, position in enumerate(units.eligible_index):
    path, leaf = path_leaves[position]
    layer = units.unit_layer[unit]
    if layer >= 0:
      path = tuple(path) + (_layout.LayerKey(layer),)
    block_id = _check_block_id(rule(path, leaf), units.unit_path(unit))
    if always[position]:
      kinds.append(ALWAYS_ACTIVE)
    elif adapters is not None and adapters(path):
      kinds.append(ADAPTER)
    elif block_id is not None:
      kinds.append(BLOCK)
    else:
      kinds.append(None)
    ids.append(block_id)
  kept = [u for u, kind in enumerate(kinds) if kind is not None]
  layout = units.subset(kept)
  block_ids = sorted({ids[u] for u in kept if kinds[u] == BLOCK},
                     key=_natural_key)
  position_of = {block_id: pos for pos, block_id in enumerate(block_ids)}
  role, position = [], []
  for u in kept:
    role.append(kinds[u])
    if kinds[u] == ALWAYS_ACTIVE:
      position.append(-1)
    elif kinds[u] == ADAPTER:
      position.append(position_of.get(ids[u], len(block_ids)))
    else:
      position.append(position_of[ids[u]])
  return BlockPartition(layout=layout, block_ids=tuple(block_ids),
                        role=tuple(role), position=tuple(position))


def block_partition(params, blocks: Optional[BlockRule] = None, *,
                    layers_per_block: Optional[int] = None,
                    include_embedding: bool = False,
                    include_head: bool = False,
                    always_active: LeafMask = None,
                    layer_axis: _layout.LayerAxis = None) -> tuple:
  """How BAdam / BREAD split ``params`` into blocks, in ascending order.

  Args:
    params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``).
    blocks, layers_per_block, include_embedding, include_head,
      always_active, layer_axis: as in :func:`blockllm_jax.badam`.

  Returns:
    A tuple of ``(block_id, paths)`` pairs, one per block position, with the
    ``'a/b/kernel'`` paths of its leaves (``'a/b/kernel[3]'`` for layer 3 of
    a stacked leaf); ``block_id`` of the active block is
    ``result[int(blockllm_jax.active_block(state))][0]``.

  Example:
    >>> for block_id, paths in blockllm_jax.block_partition(params):
    ...   print(block_id, len(paths))
  """
  rule = resolve_rule(blocks, layers_per_block, include_embedding,
                      include_head)
  partition = build_partition(params, rule, always_active,
                              layer_axis=layer_axis)
  return tuple((block_id, partition.paths_of_block(pos))
               for pos, block_id in enumerate(partition.block_ids))


def resolve_rule(blocks, layers_per_block, include_embedding,
                 include_head) -> BlockRule:
  """The rule to use: ``blocks`` itself or :func:`layer_blocks`."""
  if blocks is None:
    return layer_blocks(1 if layers_per_block is None else layers_per_block,
                        include_embedding=include_embedding,
                        include_head=include_head)
  if not callable(blocks):
    raise ValueError(
        "`blocks` must be None (one block per transformer layer) or a rule "
        f"`(path, leaf) -> int | str | None`; got {blocks!r}.")
  if layers_per_block is not None or include_embedding or include_head:
    raise ValueError(
        "`layers_per_block`, `include_embedding` and `include_head` configure "
        "the default rule and cannot be combined with a custom `blocks` rule; "
        "build on `blockllm_jax.layer_blocks(...)` inside your rule instead.")
  return blocks


def check_partition(partition: BlockPartition, blocks,
                    include_embedding: bool, include_head: bool) -> None:
  """Raises a ``ValueError`` when the rule leaves nothing to schedule."""
  layout = partition.layout
  if not layout.paths:
    return
  if not partition.num_blocks:
    rule = ("the default rule (one block per `layers_<i>` / `h/<i>` / "
            "`block<i>` path component)" if blocks is None else
            "the given `blocks` rule")
    raise ValueError(
        f"`blocks`: {rule} puts no float leaf into a block; leaves were "
        f"{list(layout.paths)[:8]}{' ...' if len(layout.paths) > 8 else ''}. "
        "Pass `blocks=` a rule `(path, leaf) -> int | str | None` that "
        "matches your parameter names.")
  if blocks is None:
    if include_embedding and -1 not in partition.block_ids:
      raise ValueError(
          "`include_embedding=True` but no parameter path matches the "
          f"embedding pattern {EMBEDDING_PATTERN.pattern!r}.")
    paths = [layout.paths[i] for i in layout.eligible_index]
    if include_head and not any(
        HEAD_PATTERN.search(part) for p in paths for part in p.split("/")):
      raise ValueError(
          "`include_head=True` but no parameter path matches the head "
          f"pattern {HEAD_PATTERN.pattern!r}.")


def pass_permutation(order: str, num_blocks: int, key: jax.Array,
                     pass_index: jax.Array) -> jax.Array:
  """int32[B] block positions in the order pass ``pass_index`` visits them.

  ``"random"`` draws ``jax.random.permutation(fold_in(key, pass_index), B)``,
  a fresh permutation per pass that depends only on the key and the pass.
  """
  if order == "ascending":
    return jnp.arange(num_blocks, dtype=jnp.int32)
  if order == "descending":
    return jnp.arange(num_blocks - 1, -1, -1, dtype=jnp.int32)
  pass_key = jax.random.fold_in(key, pass_index)
  return jax.random.permutation(pass_key, num_blocks).astype(jnp.int32)


class ScheduleStep(NamedTuple):
  active: jax.Array  # int32[] position of the block trained at this step.
  permutation: jax.Array  # int32[B] order of the current pass.
  switch: jax.Array  # bool[] first step of a block (its moments restart).
  block_step: jax.Array  # int32[] steps of this block before this one.


def schedule_step(step: jax.Array, switch_every, num_blocks: int, order: str,
                  key: jax.Array, permutation: jax.Array) -> ScheduleStep:
  """The block trained at finite step ``step`` (0-based).

  Every block gets exactly ``switch_every`` consecutive steps; each pass
  visits all ``num_blocks`` blocks once in its order; a new random
  permutation is drawn at the first step of each pass.

  Args:
    step: int32[] finite steps taken before this one.
    switch_every: steps per block K (>= 1).
    num_blocks: number of blocks B (>= 1).
    order: one of :data:`ORDERS`.
    key: uint32[2] PRNG key of the random order.
    permutation: int32[B] the order of the pass the previous step was in.

  Returns:
    A :class:`ScheduleStep`.
  """
  slot = step // switch_every
  block_step = step - slot * switch_every
  slot_in_pass = slot % num_blocks
  switch = block_step == 0
  fresh = pass_permutation(order, num_blocks, key, slot // num_blocks)
  permutation = jnp.where(switch & (slot_in_pass == 0), fresh, permutation)
  return ScheduleStep(active=permutation[slot_in_pass],
                      permutation=permutation, switch=switch,
                      block_step=block_step)


def in_scope(position, active, scope: str):
  """Whether an inactive-block correction reaches block ``position``.

  ``"all"``: every position but the active one; ``"partial"``: the
  positions after it (between the active block and the output). Works on
  Python ints and on arrays.
  """
  if scope == "all":
    return position != active
  return position > active
