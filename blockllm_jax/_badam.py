"""BAdam: Adam on one block of layers at a time, switched on a schedule.

This module is BAdam's *selection policy*: a schedule of blocks, a pure
function of the finite-step count held in the state. The packed-moment
Adam core is the engine's (:mod:`blockllm_jax._engine`), shared with
BlockLLM; BREAD (:mod:`blockllm_jax._bread`) is this policy plus a
correction of the inactive blocks (:mod:`blockllm_jax._corrections`). The
Adam moments of the active set live in two flat buffers whose size is fixed
at ``init`` (always-active leaves plus the largest block period), and which
leaves they cover is data, so a block switch changes values, never shapes:
one compilation per run.

Layout of the moment buffers: the always-active leaves first, at fixed
offsets; then the leaves of the current block period (the active block,
plus BREAD's in-scope LoRA adapters), packed in leaf order. Those restart
from zero at every switch, with a fresh bias correction.

A block period is one of ``B`` sets known in advance: the step's offsets
are a row of a static table, indexed by the active block.

References:
  Luo, Yu and Li, "BAdam: A Memory Efficient Full Parameter Optimization
  Method for Large Language Models", 2024. https://arxiv.org/abs/2404.02827
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockllm_jax import _blocks
from blockllm_jax import _corrections
from blockllm_jax import _engine
from blockllm_jax import _introspect
from blockllm_jax import _layout
from blockllm_jax import _lean
from blockllm_jax import _nnx
from blockllm_jax import _sharding
from blockllm_jax import _validation

class ScaleByBAdamState(NamedTuple):
  """State of :func:`scale_by_badam` and :func:`scale_by_bread`; arrays only.

  ``L`` is the number of units with a role (in a block, always active, or a
  BREAD adapter; a unit is a leaf, or one layer of a stacked leaf), ``B``
  the number of blocks, ``capacity`` the coordinates of the always-active
  units plus those of the largest block period.
  """

  count: jax.Array  # int32[] finite steps taken: the schedule's clock.
  mu: jax.Array  # moment_dtype[capacity] first moments (see module doc).
  nu: jax.Array  # moment_dtype[capacity] second moments, same layout.
  active_block: jax.Array  # int32[] block position trained last; -1 at first.
  permutation: jax.Array  # int32[B] block positions in this pass's order.
  key: jax.Array  # uint32[2] PRNG key; pass p uses fold_in(key, p).
  selected: jax.Array  # bool[L] leaves trained with Adam at the last step.
  corrected: jax.Array  # bool[L] leaves given an SGD correction then.
  offset: jax.Array  # int32[L] start of a selected leaf's moments in mu / nu.
  leaf_index: jax.Array  # int32[L] flat position of the unit's leaf.
  selection_count: jax.Array  # int32[] blocks activated (first included).
  skipped_count: jax.Array  # int32[] steps skipped for a non-finite value.
  unit_layer: jax.Array  # int32[L] the unit's layer in a stacked leaf, or -1.


_introspect.register_state_type(ScaleByBAdamState)


class _Plan(NamedTuple):
  """What every leaf does under each active block (static NumPy tables).

  ``B`` blocks, ``L`` leaves of the partition. Always-active leaves sit at
  fixed offsets ``[0, always_total)`` of the packed vectors; the block
  period's leaves follow, packed in leaf order.
  """

  always_total: int
  capacity: int
  period: np.ndarray  # bool[B, L] trained with Adam that restarts at switches.
  corrected: np.ndarray  # bool[B, L] given an SGD correction.
  offset: np.ndarray  # int32[B, L] start of the leaf in the packed vectors.


def _plan(partition: _blocks.BlockPartition,
          fix: _corrections.Correction) -> _Plan:
  """The static tables, and the capacity: always-active coordinates plus
  those of the largest block period (the block, plus for BREAD's LoRA
  correction the adapters in scope, which depend on the block)."""
  sizes = np.asarray(partition.layout.sizes, np.int64)
  role = np.asarray(partition.role)
  position = np.asarray(partition.position)
  num_blocks = partition.num_blocks
  always = role == _blocks.ALWAYS_ACTIVE
  always_sizes = np.where(always, sizes, 0)
  always_total = int(always_sizes.sum())
  period = np.zeros([num_blocks, len(sizes)], bool)
  corrected = np.zeros_like(period)
  offset = np.zeros(period.shape, np.int64)
  for active in range(num_blocks):
    adapters, corrected[active] = _corrections.block_tables(
        role, position, active, fix)
    period[active] = ((role == _blocks.BLOCK) & (position == active)
                      | adapters)
    used = np.where(period[active], sizes, 0)
    offset[active] = np.where(always, np.cumsum(always_sizes) - always_sizes,
                              always_total + np.cumsum(used) - used)
  capacity = always_total + int(
      max((np.where(p, sizes, 0).sum() for p in period), default=0))
  _engine.check_capacity(capacity, "use smaller blocks")
  return _Plan(always_total=always_total, capacity=capacity, period=period,
               corrected=corrected, offset=offset.astype(np.int32))


def _scale_by_block_adam(
    *,
    switch_every: int,
    order: str,
    blocks: Optional[_blocks.BlockRule],
    layers_per_block: Optional[int],
    include_embedding: bool,
    include_head: bool,
    always_active: _blocks.LeafMask,
    seed: int,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    weight_decay: float,
    moment_dtype: Any,
    correction: Optional[str] = None,
    correction_scale: float = 1.0,
    scope: str = "all",
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """BAdam (``correction=None``) or BREAD: the block-schedule policy.

  One step: the schedule gives the active block ``a``; the always-active
  leaves and ``a``'s period (offsets from a static table indexed by ``a``)
  are the step's Adam set, which the engine (:mod:`blockllm_jax._engine`)
  packs, updates and reads back; BREAD's corrections
  (:mod:`blockllm_jax._corrections`) then touch the inactive blocks.
  """
  _validation.check_integer("switch_every", switch_every, 1)
  _validation.check_choice("order", order, _blocks.ORDERS)
  if layers_per_block is not None:
    _validation.check_integer("layers_per_block", layers_per_block, 1)
  settings = _engine.adam_settings(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                   weight_decay=weight_decay,
                                   moment_dtype=moment_dtype)
  fix = _corrections.correction(correction, correction_scale, scope)
  rule = _blocks.resolve_rule(blocks, layers_per_block, include_embedding,
                              include_head)

  def partition_of(tree) -> _blocks.BlockPartition:
    return _blocks.build_partition(tree, rule, always_active,
                                   _corrections.adapter_rule(fix), layer_axis)

  def layout_of(tree) -> _layout.LeafLayout:
    return partition_of(tree).layout

  def init_fn(params):
    partition = partition_of(params)
    _blocks.check_partition(partition, blocks, include_embedding,
                            include_head)
    _corrections.require_adapters(partition, fix)
    plan = _sharding.init_plan(param_sharding, params)
    _layout.check_sharded_layers(partition.layout, plan)
    if plan is not None:
      # Each device packs its own shards: the plan of the local shapes.
      partition = partition_of(_sharding.local_tree(params, plan))
    capacity = _plan(partition, fix).capacity
    num_leaves = partition.layout.num_eligible
    key = jax.random.PRNGKey(_validation.static_int("seed", seed, 0))
    if partition.num_blocks:
      permutation = _blocks.pass_permutation(order, partition.num_blocks, key,
                                             jnp.zeros([], jnp.int32))
    else:
      permutation = jnp.zeros([0], jnp.int32)
    scalar = lambda value=0: jnp.full([], value, jnp.int32)
    return _sharding.place_state(ScaleByBAdamState(
        count=scalar(),
        mu=_sharding.zeros_buffer(capacity, settings.moment_dtype, plan),
        nu=_sharding.zeros_buffer(capacity, settings.moment_dtype, plan),
        active_block=scalar(-1),
        permutation=permutation,
        key=key,
        selected=jnp.zeros([num_leaves], bool),
        corrected=jnp.zeros([num_leaves], bool),
        offset=jnp.zeros([num_leaves], jnp.int32),
        leaf_index=jnp.asarray(partition.layout.eligible_index,
                               jnp.int32).reshape(-1),
        selection_count=scalar(),
        skipped_count=scalar(),
        unit_layer=jnp.asarray(partition.layout.unit_layer,
                               jnp.int32).reshape(-1),
    ), plan)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    updates = _nnx.resolve(updates)  # nnx.Optimizer passes lean stand-ins on
    if param_sharding is None:
      return local_update(updates, state, params, value)

    def lean_step(grads, state, layout, local_like, mesh_plan):
      del layout
      partition = partition_of(local_like)
      plan = checked_plan(partition,
                          state.mu.shape[0] // mesh_plan.num_devices)
      _, adam, offset = schedule_of(state, partition, plan)
      packed, dense = lean_backward(grads, partition, adam, offset,
                                    mesh_plan)
      return _lean.PackedStep(local_like, packed, dense)

    return _sharding.dispatch(param_sharding, updates, state, params, value,
                              layout_of=layout_of, local_update=local_update,
                              lean_step=lean_step)

  def checked_plan(partition, held: int) -> _Plan:
    """The static tables; ``held``: moment coordinates the state holds for
    this tree (per device on a mesh)."""
    plan = _plan(partition, fix)
    if plan.capacity != held:
      raise ValueError(
          f"The state holds {held} moment coordinates but this tree needs "
          f"{plan.capacity}: was it initialised for other params?")
    return plan

  def schedule_of(state, partition, plan):
    """The step's block schedule, which leaves Adam trains (bool[L]) and
    their offsets in the packed vectors (int32[L])."""
    schedule = _blocks.schedule_step(state.count, switch_every,
                                     partition.num_blocks, order, state.key,
                                     state.permutation)
    is_always = np.asarray(partition.role) == _blocks.ALWAYS_ACTIVE
    adam = jnp.asarray(plan.period)[schedule.active] | jnp.asarray(is_always)
    offset = jnp.asarray(plan.offset)[schedule.active]
    return schedule, adam, offset

  def lean_backward(grads, partition, adam, offset, mesh_plan=None):
    """One backward pass: the active period's and the always-active leaves'
    gradients land packed at their offsets; an SGD correction needs the
    blocks' whole gradients, as in the plain path.

    Returns ``(packed, dense)``: ``dense`` has the whole gradient of each
    corrected block leaf and None for the others."""
    result = grads.backward(
        partition.layout.eligible_index, packed=adam, offset=offset,
        dense=_corrections.dense_needed(partition.role, fix),
        mesh_plan=mesh_plan)
    return result.packed, per_group(partition, result.dense)

  def per_group(partition, dense):
    """Per-unit dense gradients -> one per group (a stack's units share
    its leaf), as the corrections take them."""
    return [dense[group.start] for group in partition.layout.groups()]

  def fused_backward(grads, partition, plan, schedule, adam, offset,
                     finite_loss, state):
    """Tier C on one device: the active leaves' gradients update their
    moment windows in the backward pass as they arrive (no packed
    gradient). At a switch the period's moments restart from zero first.
    A non-finite loss writes nothing; a leaf whose gradient is not finite
    keeps its moments and the step is skipped, though the other active
    leaves have taken this gradient into their moments.

    Returns ``(result, dense)``: the ``_lean.LeanResult`` (updated moments;
    ``norm_sq`` holds each active leaf's squared norm) and its dense
    gradients."""
    restart = finite_loss & schedule.switch & (
        jnp.arange(plan.capacity) >= plan.always_total)
    zero = lambda m: jnp.where(restart, jnp.zeros((), m.dtype), m)
    result = grads.backward(
        partition.layout.eligible_index, packed=adam & finite_loss,
        offset=offset, dense=_corrections.dense_needed(partition.role, fix),
        moments=(zero(state.mu), zero(state.nu)), adam=settings,
        salt=state.count)
    return result, per_group(partition, result.dense)

  def local_update(updates, state, params, value, reduce=None):
    """The update on one device's shards (all of the params without
    sharding); ``reduce`` combines the finiteness checks across devices."""
    _engine.require_params(settings, params)
    lean = isinstance(updates, (_lean.LeanGradients, _lean.PackedStep))
    tree = updates.params_like if lean else updates
    partition = partition_of(tree)
    layout = partition.layout
    if not layout.eligible_index:
      return ((layout.updates_tree(tree, []) if lean else updates),
              state)
    plan = checked_plan(partition, state.mu.shape[0])
    role = partition.role
    schedule, adam, offset = schedule_of(state, partition, plan)
    corrected = jnp.asarray(plan.corrected)[schedule.active]
    # Always-active leaves count every finite step, the period's leaves
    # the steps of the current block.
    # A step is skipped when what it uses is not finite: the loss (if
    # given), the Adam-trained leaves' gradients and, for an SGD
    # correction, the gradients of the blocks. Frozen leaves' gradients do
    # not matter (the original does not even compute them).
    finite = jnp.ones([], bool)
    if value is not None:
      finite = jnp.isfinite(_validation.scalar_loss(value))
    fused = None
    if isinstance(updates, _lean.PackedStep):
      packed, grads = updates.packed, updates.dense
    elif lean and updates.fused_capable:
      fused, grads = fused_backward(updates, partition, plan, schedule, adam,
                                    offset, finite, state)
      packed = None
      finite &= jnp.all(jnp.isfinite(fused.norm_sq))
    elif lean:
      packed, grads = lean_backward(updates, partition, adam, offset)
    else:
      # One gradient per group of units (a stacked leaf whole).
      packed, grads = None, layout.group_leaves(updates)
      finite &= jnp.all(_engine.finite_units(layout, updates) | ~adam)
    if packed is not None:
      finite &= _engine.usable(packed)
    finite &= _corrections.gradients_finite(grads, layout, role, fix)
    finite = _sharding.all_true(finite, reduce)

    is_always = jnp.asarray(np.asarray(role) == _blocks.ALWAYS_ACTIVE)
    # Always-active leaves count every finite step, the period's leaves
    # the steps of the current block; the period restarts at a switch.
    count = jnp.where(is_always, state.count + 1, schedule.block_step + 1)
    units = _engine.per_unit(offset, adam & finite, count, settings,
                             flag=corrected & finite,
                             restart=schedule.switch & ~is_always,
                             layout=layout, salt=state.count)
    if fused is not None:
      mu, nu = fused.moments
    elif packed is None:
      mu, nu = _engine.update_unit_moments(state.mu, state.nu, grads, units,
                                           settings, layout)
    else:
      restart = schedule.switch & (jnp.arange(plan.capacity)
                                   >= plan.always_total)
      mu, nu = _engine.update_moments(state.mu, state.nu, packed, finite,
                                      settings, restart=restart,
                                      salt=units.salt)
    leaf_params = (layout.group_leaves(params)
                   if settings.use_weight_decay else None)
    leaf_updates = _engine.unit_updates(mu, nu, layout, units, settings,
                                        leaf_params)
    leaf_updates = _corrections.correct(leaf_updates, grads, layout, role,
                                        units, fix)

    step = finite.astype(jnp.int32)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = ScaleByBAdamState(
        count=state.count + step,
        mu=mu,
        nu=nu,
        active_block=keep(schedule.active, state.active_block),
        permutation=keep(schedule.permutation, state.permutation),
        key=state.key,
        selected=keep(adam, state.selected),
        corrected=keep(corrected, state.corrected),
        offset=keep(jnp.where(adam, offset, 0), state.offset),
        leaf_index=state.leaf_index,
        selection_count=state.selection_count + (
            finite & schedule.switch).astype(jnp.int32),
        skipped_count=state.skipped_count + (1 - step),
        unit_layer=state.unit_layer,
    )
    return layout.updates_tree(tree, leaf_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_badam(
    switch_every: int = 100,
    order: str = "random",
    *,
    blocks: Optional[_blocks.BlockRule] = None,
    layers_per_block: Optional[int] = None,
    include_embedding: bool = False,
    include_head: bool = False,
    always_active: _blocks.LeafMask = None,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    moment_dtype: Any = "float32",
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates with Adam on one block of layers at a time (BAdam).

  The parameters are split into blocks (default: one per transformer layer,
  see :func:`blockllm_jax.layer_blocks`). Each block is trained with Adam
  for exactly ``switch_every`` consecutive finite steps, then the next block
  of the pass takes over; a pass visits every block once. All other leaves
  get an update of exactly zero. Adam moments exist only for the active
  block, in two buffers the size of the largest block, and restart from
  zero (with a fresh bias correction) at every switch. Leaves named in
  ``always_active`` are trained at every step and keep their moments.

  The schedule is a function of the finite-step count (and, for
  ``order="random"``, of a key from ``seed``), all held in the state: a
  resumed run switches exactly like an uninterrupted one. A step whose
  ``value`` (if given) or whose gradients *used by the step* (the active
  block's and the always-active leaves'; for BREAD's SGD correction, every
  block's) are not finite (or, from about 1.8e19 on, too large to square in
  float32) returns zero updates, leaves the state untouched
  (the schedule does not advance, so every block still gets
  ``switch_every`` finite steps) and increments ``skipped_count``.
  Gradients of frozen leaves are ignored, as the original never computes
  them.

  Updates of parameters narrower than float32 (bf16, fp16) come back in
  float32, so that the learning rate and the final rounding act on the
  exact value; :func:`blockllm_jax.badam` ends with
  :func:`blockllm_jax.stochastic_rounding` so that small steps on bf16
  weights are not rounded away.

  Args:
    switch_every: steps per block, K (>= 1).
    order: ``"ascending"`` (input to output), ``"descending"`` or
      ``"random"`` (a fresh permutation of the blocks every pass).
    blocks: None for the default rule, or a rule ``(path, leaf) -> int |
      str | None`` giving each leaf's block id (None: never trained). Blocks
      are ordered by id: ints ascending, then strings in natural order.
      Under ``optax.inject_hyperparams`` name it in ``static_args``.
    layers_per_block: for the default rule, consecutive layers per block
      (None: 1; None keeps it static under ``optax.inject_hyperparams``).
    include_embedding: for the default rule, the input embedding is a block.
    include_head: for the default rule, the output head together with the
      leaves outside every layer (e.g. the final norm) is a block.
    always_active: leaves trained with Adam at every step (e.g. a freshly
      initialised head): a predicate ``(path, leaf) -> bool`` or a pytree of
      bools; they leave their block and keep their moments across switches.
    seed: seed of the random order.
    b1, b2: Adam decay rates, in [0, 1).
    eps, eps_root: Adam epsilons (>= 0), as in ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay of the Adam-trained leaves (>= 0);
      needs ``params``.
    moment_dtype: dtype of the compact moments (default float32).
    param_sharding: ``None`` (one device), or a pytree of
      ``jax.sharding.NamedSharding`` like the params: each device then keeps
      the moments of its own shards of the active leaves (about ``1 /
      devices`` of the state; see :func:`blockllm_jax.state_sharding`).
      Works with the full gradient and with
      :func:`blockllm_jax.lean_value_and_grad`.
    layer_axis: for models whose leaves stack their layers (``nn.scan``,
      MaxText, Levanter): as in :func:`blockllm_jax.scale_by_blockllm`.
      Layer ``i`` of every stacked leaf is then a unit, which the default
      ``blocks`` rule puts in block ``i // layers_per_block`` (next to the
      unstacked leaves whose path names layer ``i``); a custom rule sees it
      as the leaf's path followed by ``LayerKey(i)``. On a mesh and with
      lean steps as in :func:`blockllm_jax.scale_by_blockllm` (a BREAD SGD
      correction needs ``jax.value_and_grad`` on stacked layers).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` accepts (and
    does not need) ``value=loss``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, blockllm_jax
    >>> params = {'layers_0': {'w': jnp.ones((4, 4))},
    ...           'layers_1': {'w': jnp.ones((4, 4))}}
    >>> tx = optax.chain(blockllm_jax.scale_by_badam(10, 'ascending'),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)  # layers_0 moves

  References:
    Luo, Yu and Li, 2024. https://arxiv.org/abs/2404.02827
  """
  return _scale_by_block_adam(
      switch_every=switch_every, order=order, blocks=blocks,
      layers_per_block=layers_per_block, include_embedding=include_embedding,
      include_head=include_head, always_active=always_active, seed=seed,
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
      moment_dtype=moment_dtype, param_sharding=param_sharding,
      layer_axis=layer_axis)


def badam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    switch_every: int = 100,
    order: str = "random",
    blocks: Optional[_blocks.BlockRule] = None,
    layers_per_block: Optional[int] = None,
    include_embedding: bool = False,
    include_head: bool = False,
    always_active: _blocks.LeafMask = None,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    moment_dtype: Any = "float32",
    stochastic_rounding: bool = True,
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """BAdam optimizer: :func:`scale_by_badam`, the learning rate, rounding.

  With one block holding every leaf and ``switch_every`` beyond the run,
  this is ``optax.adamw``.

  Args:
    learning_rate: a float (>= 0) or an Optax schedule.
    switch_every, order, blocks, layers_per_block, include_embedding,
      include_head, always_active, seed, b1, b2, eps, eps_root,
      weight_decay, moment_dtype, param_sharding, layer_axis: see
      :func:`scale_by_badam`.
    stochastic_rounding: end with :func:`blockllm_jax.stochastic_rounding`
      (seeded with ``seed``), so that updates of bf16 / fp16 parameters are
      rounded stochastically instead of to nearest. No effect on float32
      parameters; costs a ``uint32[2]`` key.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = blockllm_jax.badam(1e-5, switch_every=50, order='ascending')
    >>> opt_state = tx.init(params)
    >>> updates, opt_state = tx.update(grads, opt_state, params)

  References:
    Luo, Yu and Li, 2024. https://arxiv.org/abs/2404.02827
  """
  return _engine.with_learning_rate(
      scale_by_badam(
          switch_every, order, blocks=blocks,
          layers_per_block=layers_per_block,
          include_embedding=include_embedding, include_head=include_head,
          always_active=always_active, seed=seed, b1=b1, b2=b2, eps=eps,
          eps_root=eps_root, weight_decay=weight_decay,
          moment_dtype=moment_dtype, param_sharding=param_sharding,
          layer_axis=layer_axis),
      learning_rate, stochastic_rounding, seed)
