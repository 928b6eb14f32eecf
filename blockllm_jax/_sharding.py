"""Compact optimizer state sharded with the parameters on a device mesh.

With ``param_sharding`` (a pytree of ``jax.sharding.NamedSharding`` like the
parameters), a transformation runs its update under ``jax.shard_map``: each
device packs the moments of *its own shards* of the selected leaves into its
own slice of the flat moment buffers. The buffers are global arrays of
``devices * local_capacity`` coordinates sharded over every mesh axis, so
each device holds about ``1 / devices`` of the state (devices that hold the
same parameter shard, e.g. along a data-parallel axis, hold the same
moments). Selection needs only per-leaf gradient norms, summed across
devices with one all-reduce of ``L`` floats; no parameter tensor, gradient
or moment is ever gathered.

Local layout: device ``d`` (row-major position in the mesh) holds, in its
slice, leaf ``l``'s local shard flattened in row-major order at
``offset[l]``. Offsets are the same on every device (all shards of a leaf
have the same shape), so the state's small vectors stay replicated.

References:
  Ramesh et al., 2024 (BlockLLM). https://arxiv.org/abs/2406.17296
  Luo, Yu and Li, 2024 (BAdam). https://arxiv.org/abs/2404.02827
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from blockllm_jax import _introspect
from blockllm_jax import _layout
from blockllm_jax import _lean

# State fields holding flat per-device moment buffers; every other field of
# our states is a small replicated vector or scalar.
_BUFFER_FIELDS = ("mu", "nu")


class MeshPlan(NamedTuple):
  """Static description of sharded parameters (Python values only).

  Attributes:
    mesh: the ``jax.sharding.Mesh`` of every parameter.
    specs: ``PartitionSpec`` of every parameter leaf, in flattening order.
    local_shapes: shape of one device's shard of every leaf.
    shards: number of distinct shards of every leaf (1: replicated).
  """

  mesh: Any
  specs: tuple
  local_shapes: tuple
  shards: tuple

  @property
  def axis_names(self) -> tuple:
    return tuple(self.mesh.axis_names)

  @property
  def num_devices(self) -> int:
    return int(self.mesh.size)

  @property
  def buffer_spec(self) -> P:
    """The moment buffers: one slice per device, over every mesh axis."""
    return P(self.axis_names)

  def buffer_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, self.buffer_spec)


def _spec_axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _mesh_sizes(mesh) -> dict:
  return dict(zip(mesh.axis_names, mesh.devices.shape))


def mesh_plan(param_sharding, tree, name: str = "param_sharding") -> MeshPlan:
  """Checks ``param_sharding`` against ``tree`` and describes the shards.

  Args:
    param_sharding: pytree of ``NamedSharding`` with ``tree``'s structure.
    tree: parameters (arrays or ``jax.ShapeDtypeStruct``), global shapes.
    name: argument name for error messages.

  Returns:
    A :class:`MeshPlan`.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  try:
    shardings = treedef.flatten_up_to(param_sharding)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"`{name}` must be a pytree of `jax.sharding.NamedSharding` with the "
        f"parameters' structure: {err}") from None
  if not shardings:
    raise ValueError(f"`{name}` is empty: the parameter tree has no leaves.")
  for sharding in shardings:
    if not isinstance(sharding, NamedSharding):
      raise ValueError(
          f"`{name}` leaves must be `jax.sharding.NamedSharding`; got "
          f"{type(sharding).__name__}.")
  mesh = shardings[0].mesh
  for sharding in shardings:
    if sharding.mesh != mesh:
      raise ValueError(f"`{name}`: every parameter must be on the same mesh.")
  sizes = _mesh_sizes(mesh)
  specs, local_shapes, shards = [], [], []
  for leaf, sharding in zip(leaves, shardings):
    shape = tuple(np.shape(leaf))
    spec = tuple(sharding.spec)
    if len(spec) > len(shape):
      raise ValueError(
          f"`{name}`: spec {sharding.spec} has more entries than the leaf's "
          f"{len(shape)} dimensions (shape {shape}).")
    spec = spec + (None,) * (len(shape) - len(spec))
    local, count = [], 1
    for dim, entry in zip(shape, spec):
      parts = math.prod(sizes[a] for a in _spec_axes(entry))
      if dim % parts:
        raise ValueError(
            f"`{name}`: a leaf of shape {shape} with spec {sharding.spec} "
            f"does not split evenly over the mesh {sizes} (dimension {dim} "
            f"over {parts} devices); use a spec whose axes divide it.")
      local.append(dim // parts)
      count *= parts
    specs.append(P(*spec))
    local_shapes.append(tuple(local))
    shards.append(count)
  return MeshPlan(mesh=mesh, specs=tuple(specs),
                  local_shapes=tuple(local_shapes), shards=tuple(shards))


def init_plan(param_sharding, params) -> Optional[MeshPlan]:
  """The plan ``init`` lays the state out by; ``None`` without sharding or
  for a tree without leaves (e.g. ``optax.tree_map_params``'s probe)."""
  if param_sharding is None or not jax.tree_util.tree_leaves(params):
    return None
  return mesh_plan(param_sharding, params)


def update_plan(param_sharding, updates) -> MeshPlan:
  """The plan of a sharded ``update`` (a gradient tree or lean gradients)."""
  if isinstance(updates, _lean.LeanGradients):
    return mesh_plan(param_sharding, updates.params_like)
  return mesh_plan(param_sharding, updates)


def local_tree(tree, plan: MeshPlan):
  """``tree`` as one device sees it: ``ShapeDtypeStruct`` of local shapes."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef.unflatten([
      jax.ShapeDtypeStruct(shape, leaf.dtype)
      for leaf, shape in zip(leaves, plan.local_shapes)
  ])


class Collective(NamedTuple):
  """Reductions across the devices inside ``shard_map`` (static).

  ``replication[l]`` is how many devices hold the same shard of eligible leaf
  ``l``: a sum over all devices counts each shard that many times.
  """

  axis_names: tuple
  replication: tuple  # float per eligible leaf.
  global_sizes: tuple  # int per eligible leaf: coordinates of the whole leaf.

  def all_true(self, flag: jax.Array) -> jax.Array:
    return lax.pmin(flag.astype(jnp.int32), self.axis_names) > 0

  def leaf_sums(self, local_sums: jax.Array) -> jax.Array:
    """float32[L]: per-leaf sums over the whole leaves from local sums."""
    return (lax.psum(local_sums, self.axis_names)
            / jnp.asarray(self.replication, local_sums.dtype))


def collective(plan: MeshPlan, eligible_index: Sequence[int],
               global_sizes: Sequence[int]) -> Collective:
  devices = plan.num_devices
  return Collective(
      axis_names=plan.axis_names,
      replication=tuple(float(devices // plan.shards[i])
                        for i in eligible_index),
      global_sizes=tuple(int(s) for s in global_sizes))


def all_true(flag: jax.Array, reduce: Optional[Collective]) -> jax.Array:
  return flag if reduce is None else reduce.all_true(flag)


def leaf_sums(local_sums: jax.Array,
              reduce: Optional[Collective]) -> jax.Array:
  return local_sums if reduce is None else reduce.leaf_sums(local_sums)


def zeros_buffer(local_capacity: int, dtype, plan: Optional[MeshPlan]):
  """A moment buffer: ``local_capacity`` zeros per device of ``plan``'s mesh,
  created directly with its sharding (never whole on one device)."""
  if plan is None:
    return jnp.zeros([local_capacity], dtype)
  return jnp.zeros([plan.num_devices * local_capacity], dtype,
                   device=plan.buffer_sharding())


def place_state(state, plan: Optional[MeshPlan]):
  """Puts a fresh state's small fields replicated on ``plan``'s mesh (where
  ``update`` returns them), so the first step does not compile again."""
  if plan is None:
    return state
  replicated = NamedSharding(plan.mesh, P())
  return type(state)(**{
      field: value if field in _BUFFER_FIELDS else jax.device_put(
          value, replicated) for field, value in state._asdict().items()
  })


def state_specs(state, plan: MeshPlan):
  """``shard_map`` specs of one of our states: buffers split, rest whole."""
  return type(state)(**{
      field: plan.buffer_spec if field in _BUFFER_FIELDS else P()
      for field in state._fields
  })


def shard_update(local_update, plan: MeshPlan, updates, state, params, value,
                 *, update_specs=None, treedef=None):
  """Runs ``local_update(updates, state, params, value)`` per device.

  ``updates`` and ``params`` arrive as local shards, the state's buffers as
  the device's own slice; the returned updates are sharded like the params.
  ``updates`` other than a gradient tree (e.g. a packed gradient) need
  their ``update_specs`` and the parameters' ``treedef``.
  """
  if treedef is None:
    treedef = jax.tree_util.tree_structure(updates)
  param_specs = treedef.unflatten(plan.specs)
  if update_specs is None:
    update_specs = param_specs
  specs = state_specs(state, plan)
  has_value = value is not None
  value = value if has_value else jnp.zeros([], jnp.float32)
  if params is None:
    run = lambda u, s, v: local_update(u, s, None, v if has_value else None)
    in_specs, args = (update_specs, specs, P()), (updates, state, value)
  else:
    run = lambda u, s, p, v: local_update(u, s, p, v if has_value else None)
    in_specs = (update_specs, specs, param_specs, P())
    args = (updates, state, params, value)
  # Replication of the outputs holds by construction (every replicated
  # output is computed from all-reduced or replicated inputs).
  return jax.shard_map(run, mesh=plan.mesh, in_specs=in_specs,
                       out_specs=(param_specs, specs), check_vma=False)(*args)


def shard_lean_update(local_update, plan: MeshPlan, step, state, params,
                      value, *, eligible_index: Sequence[int], treedef):
  """``shard_update`` of a lean step whose backward pass ran on the global
  view.

  ``step`` is a ``_lean.PackedStep`` of global arrays (``params_like`` the
  local shapes): its packed gradient in the buffer's sharding, the dense
  gradients of eligible leaves (``eligible_index`` maps them to parameters)
  sharded like their parameters, and a replicated ``decision``.
  ``local_update`` gets the same ``PackedStep`` with each device's shards.
  """
  dense_at = [i for i, g in enumerate(step.dense) if g is not None]

  def run(arrays, state, params, value):
    packed, dense, decision = arrays
    full = [None] * len(step.dense)
    for position, array in zip(dense_at, dense, strict=True):
      full[position] = array
    local = dataclasses.replace(step, packed=packed, dense=full,
                                decision=decision)
    return local_update(local, state, params, value)

  arrays = (step.packed, tuple(step.dense[i] for i in dense_at),
            step.decision)
  specs = (plan.buffer_spec,
           tuple(plan.specs[eligible_index[i]] for i in dense_at),
           jax.tree.map(lambda _: P(), step.decision))
  return shard_update(run, plan, arrays, state, params, value,
                      update_specs=specs, treedef=treedef)


def dispatch(param_sharding, updates, state, params, value, *, layout_of,
             local_update, lean_step):
  """The ``update`` of a block optimizer built with ``param_sharding``.

  A full gradient tree runs ``local_update`` per device (``shard_map``). A
  lean gradient first runs its backward pass on the global view, where it
  is the model's and XLA partitions it, through the policy's
  ``lean_step(updates, state, layout, local_like, plan)`` returning a
  ``_lean.PackedStep``; the rest of the update then runs per device.

  Args:
    param_sharding: pytree of ``NamedSharding`` like the params.
    updates: gradients or a ``_lean.LeanGradients``.
    state, params, value: as passed to ``update``.
    layout_of: ``tree -> LeafLayout`` of the optimizer's units.
    local_update: ``(updates, state, params, value, reduce) -> (updates,
      state)`` on one device's shards.
    lean_step: see above.
  """
  plan = update_plan(param_sharding, updates)
  lean = isinstance(updates, _lean.LeanGradients)
  tree = updates.params_like if lean else updates
  layout = layout_of(tree)
  _layout.check_sharded_layers(layout, plan)
  reduce = collective(plan, layout.eligible_index, layout.sizes)
  run = lambda u, s, p, v: local_update(u, s, p, v, reduce)
  if not lean:
    return shard_update(run, plan, updates, state, params, value)
  if not layout.eligible_index:
    return layout.updates_tree(tree, []), state
  local_like = local_tree(tree, plan)
  step = lean_step(updates, state, layout, local_like, plan)
  return shard_lean_update(
      run, plan, dataclasses.replace(step, params_like=local_like), state,
      params, value, eligible_index=layout.eligible_index,
      treedef=layout.treedef)


def local_capacity(global_capacity: int, global_sizes: Sequence[int],
                   local_sizes: Sequence[int]) -> int:
  """Per-device coordinates that any selection of at most
  ``global_capacity`` global coordinates needs.

  A selection ``S`` uses ``sum_S size_l / k_l`` coordinates per device, with
  ``k_l`` the number of shards of leaf ``l``. That is at most the total of
  the unsharded eligible leaves plus ``global_capacity / k_min`` (``k_min``
  the fewest shards of a sharded leaf), and never more than the global
  capacity nor less than the largest local leaf.
  """
  unsharded = sum(g for g, s in zip(global_sizes, local_sizes) if g == s)
  ratios = [g // s for g, s in zip(global_sizes, local_sizes) if g != s]
  bound = global_capacity
  if ratios:
    bound = min(bound, unsharded + -(-global_capacity // min(ratios)))
  return max(bound, max(local_sizes, default=0))


# ----------------------------------------------------------------------------
# Public helpers: state shardings, FSDP shardings, relayout between meshes.
# ----------------------------------------------------------------------------


def _state_types() -> tuple:
  return tuple(_introspect._STATE_TYPES)


def _mesh_of(param_sharding):
  for sharding in jax.tree_util.tree_leaves(param_sharding):
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  raise ValueError("`param_sharding` holds no `jax.sharding.NamedSharding`.")


def state_sharding(tx: optax.GradientTransformation, params, param_sharding):
  """Shardings of ``tx.init(params)`` when the params are ``param_sharding``.

  Our compact moment buffers are split over every mesh axis (each device
  its own slice), the small selection vectors are replicated, and leaves of
  other transformations in a chain that look like the parameters get the
  parameters' shardings (``optax.tree_map_params``); everything else is
  replicated. Optax's generic rule alone would replicate our buffers, which
  would cost every device the whole state.

  Args:
    tx: the optimizer; our transformations in it must have been built with
      the same ``param_sharding``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    param_sharding: pytree of ``NamedSharding`` like ``params``.

  Returns:
    A pytree of ``NamedSharding`` with the structure of ``tx.init(params)``,
    for ``jax.jit(..., out_shardings=...)``, ``jax.device_put`` or an Orbax
    restore target.

  Example:
    >>> mesh = jax.make_mesh((8,), ("fsdp",))
    >>> shardings = blockllm_jax.fsdp_sharding(params, mesh)
    >>> tx = blockllm_jax.blockllm(1e-3, param_sharding=shardings)
    >>> opt_state = jax.jit(tx.init, out_shardings=blockllm_jax.state_sharding(
    ...     tx, params, shardings))(params)
  """
  mesh = _mesh_of(param_sharding)
  replicated = NamedSharding(mesh, P())
  plan = mesh_plan(param_sharding, params)
  abstract = jax.eval_shape(tx.init, params)
  types = _state_types()
  generic = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract, param_sharding,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, types))
  ours = lambda node: type(node)(**{
      field: plan.buffer_sharding() if field in _BUFFER_FIELDS else replicated
      for field in node._fields
  })
  return jax.tree_util.tree_map(
      lambda node, fallback: ours(node) if isinstance(node, types)
      else fallback,
      abstract, generic, is_leaf=lambda x: isinstance(x, types))


def fsdp_sharding(params, mesh, axes: Any = None, *, min_size: int = 1024):
  """Fully-sharded-data-parallel shardings for a parameter tree.

  Each leaf with at least ``min_size`` coordinates is split along its
  largest dimension that the product of ``axes`` divides (ties: the first);
  smaller or indivisible leaves are replicated.

  Args:
    params: parameters (arrays or ``jax.ShapeDtypeStruct``).
    mesh: a ``jax.sharding.Mesh``.
    axes: a mesh axis name or tuple of names to shard over; default all.
    min_size: leaves smaller than this stay replicated (>= 1).

  Returns:
    A pytree of ``NamedSharding`` like ``params``.

  Example:
    >>> mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
    >>> shardings = blockllm_jax.fsdp_sharding(params, mesh, "fsdp")
    >>> params = jax.device_put(params, shardings)
  """
  if axes is None:
    axes = tuple(mesh.axis_names)
  axes = _spec_axes(axes)
  sizes = _mesh_sizes(mesh)
  unknown = [a for a in axes if a not in sizes]
  if unknown:
    raise ValueError(f"`axes` {unknown} are not axes of the mesh "
                     f"{tuple(mesh.axis_names)}.")
  if not isinstance(min_size, int) or min_size < 1:
    raise ValueError(f"`min_size` must be an int >= 1; got {min_size!r}.")
  parts = math.prod(sizes[a] for a in axes)
  entry = axes[0] if len(axes) == 1 else axes

  def one(leaf):
    shape = tuple(np.shape(leaf))
    if math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    dims = [d for d in np.argsort([-s for s in shape], kind="stable")
            if shape[d] % parts == 0]
    if not dims:
      return NamedSharding(mesh, P())
    spec = [None] * len(shape)
    spec[int(dims[0])] = entry
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map(one, params)


def _mesh_layout(mesh) -> tuple:
  """((axis, size), ...) of a mesh, or () for a single device."""
  if mesh is None:
    return ()
  return tuple(_mesh_sizes(mesh).items())


def blocks_of(leaf: jax.Array, mesh_layout: tuple, spec) -> jax.Array:
  """``[devices, local size]``: row ``d`` is device ``d``'s shard of ``leaf``
  (row-major over the mesh), flattened row-major, as ``shard_map`` sees it."""
  shape = leaf.shape
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  sizes = dict(mesh_layout)
  split, axis_dim, chunks = [], {}, []
  for dim, entry in zip(shape, spec):
    axes = _spec_axes(entry)
    parts = math.prod(sizes[a] for a in axes)
    for a in axes:
      axis_dim[a] = len(split)
      split.append(sizes[a])
    chunks.append(len(split))
    split.append(dim // parts)
  x = leaf.reshape(split)
  used = [axis_dim[a] for a, _ in mesh_layout if a in axis_dim]
  x = jnp.transpose(x, used + chunks)
  # Unused mesh axes replicate the shard: insert and broadcast them.
  full = [n for _, n in mesh_layout]
  expand = [i for i, (a, _) in enumerate(mesh_layout) if a not in axis_dim]
  x = jnp.expand_dims(x, expand) if expand else x
  x = jnp.broadcast_to(x, full + list(x.shape[len(full):]))
  return x.reshape(max(1, math.prod(full)), -1)


def global_of(blocks: jax.Array, mesh_layout: tuple, spec,
              shape: Sequence[int]) -> jax.Array:
  """Inverse of :func:`blocks_of`: the whole leaf from its devices' shards."""
  shape = tuple(shape)
  spec = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
  sizes = dict(mesh_layout)
  full = [n for _, n in mesh_layout]
  local = []
  for dim, entry in zip(shape, spec):
    local.append(dim // math.prod(sizes[a] for a in _spec_axes(entry)))
  x = blocks.reshape(full + local)
  # Replicated axes: every copy is the same; take the first.
  index = tuple(slice(None) if any(a in _spec_axes(e) for e in spec) else 0
                for a, _ in mesh_layout)
  x = x[index]
  used = [a for a, _ in mesh_layout if any(a in _spec_axes(e) for e in spec)]
  # Dimensions of x: used mesh axes (mesh order), then local chunks; bring
  # each dimension's axes (spec order, major first) in front of its chunk.
  order = []
  for d, entry in enumerate(spec):
    order += [used.index(a) for a in _spec_axes(entry)]
    order.append(len(used) + d)
  return jnp.transpose(x, order).reshape(shape)


def reshard_state(state, params, source_sharding, target_sharding, like):
  """Moves our moment buffers from one mesh layout to another.

  A checkpoint saved on one mesh restores onto another as arrays of the
  *source* layout (global shapes as saved); this rewrites every compact
  buffer for the target mesh, one leaf at a time (no full-size copy of the
  state), and recomputes the offsets. ``None`` for a sharding means the
  single-device layout, so this also converts a sharded state to the
  unsharded one (and back).

  Args:
    state: optimizer state in the source layout (concrete arrays).
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``, global
      shapes).
    source_sharding, target_sharding: pytrees of ``NamedSharding`` like the
      params, or ``None``.
    like: ``jax.eval_shape(target_tx.init, params)``: the target's shapes.

  Returns:
    The state in the target layout (sharded by ``target_sharding`` when it
    is given, see :func:`state_sharding`).

  Example:
    >>> restored = checkpointer.restore(path, saved_abstract_state)
    >>> opt_state = blockllm_jax.reshard_state(
    ...     restored, params, old_shardings, new_shardings,
    ...     jax.eval_shape(new_tx.init, params))
  """
  types = _state_types()
  is_ours = lambda x: isinstance(x, types)
  leaves = jax.tree_util.tree_leaves(params)
  plans = [None if s is None else mesh_plan(s, params, name)
           for s, name in ((source_sharding, "source_sharding"),
                           (target_sharding, "target_sharding"))]
  layouts = [((), tuple(P() for _ in leaves),
              tuple(tuple(np.shape(x)) for x in leaves)) if plan is None else
             (_mesh_layout(plan.mesh), plan.specs, plan.local_shapes)
             for plan in plans]

  def convert(node, target):
    if not is_ours(node):
      return node
    index = [int(i) for i in np.asarray(jax.device_get(node.leaf_index))]
    (src_mesh, src_specs, src_local), (dst_mesh, dst_specs, dst_local) = layouts
    src_sizes = [math.prod(src_local[i]) for i in index]
    dst_sizes = [math.prod(dst_local[i]) for i in index]
    shapes = [tuple(np.shape(leaves[i])) for i in index]
    src_devices = max(1, math.prod(n for _, n in src_mesh))
    dst_devices = max(1, math.prod(n for _, n in dst_mesh))
    capacity = target.mu.shape[0] // dst_devices
    old_offset = np.asarray(jax.device_get(node.offset), np.int64)
    selected = np.asarray(jax.device_get(node.selected), bool)
    # Keep the buffer's order of leaves, pack them with the target sizes.
    new_offset = np.zeros(len(index), np.int64)
    used = 0
    for k in sorted(np.flatnonzero(selected), key=lambda k: old_offset[k]):
      new_offset[k] = used
      used += dst_sizes[k]
    if used > capacity:
      raise ValueError(f"The selection needs {used} coordinates per device, "
                       f"the target layout holds {capacity}.")

    def move(buffer):
      source = buffer.reshape(src_devices, -1)
      out = jnp.zeros([dst_devices, capacity], buffer.dtype)
      for k in np.flatnonzero(selected):
        window = lax.dynamic_slice_in_dim(source, int(old_offset[k]),
                                          src_sizes[k], axis=1)
        whole = global_of(window, src_mesh, src_specs[index[k]], shapes[k])
        out = lax.dynamic_update_slice_in_dim(
            out, blocks_of(whole, dst_mesh, dst_specs[index[k]]),
            int(new_offset[k]), axis=1)
      return out.reshape(-1)

    out_sharding = None if plans[1] is None else plans[1].buffer_sharding()
    move = jax.jit(move, out_shardings=out_sharding)
    fields = node._asdict()
    fields.update(offset=jnp.asarray(new_offset, jnp.int32))
    if plans[1] is not None:  # small fields: replicated on the target mesh
      replicated = NamedSharding(plans[1].mesh, P())
      fields = {k: jax.device_put(v, replicated) for k, v in fields.items()}
    fields.update(mu=move(node.mu), nu=move(node.nu))
    return type(node)(**fields)

  return jax.tree_util.tree_map(convert, state, like, is_leaf=is_ours)
