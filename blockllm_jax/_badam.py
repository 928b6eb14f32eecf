"""BAdam: Adam on one block of layers at a time, switched on a schedule.

The engine here also runs BREAD (:mod:`blockllm_jax._bread`), which adds a
correction of the inactive blocks in the same step. Like BlockLLM, the Adam
moments of the active set live in two flat buffers whose size is fixed at
``init`` (always-active leaves plus the largest block period), and which
leaves they cover is data, so a block switch changes values, never shapes:
one compilation per run.

Layout of the moment buffers: the always-active leaves first, at fixed
offsets; then the leaves of the current block period (the active block,
plus BREAD's in-scope LoRA adapters), packed in leaf order. Those restart
from zero at every switch, with a fresh bias correction.

Unlike BlockLLM's arbitrary leaf sets, a block period is one of ``B`` sets
known in advance, so the step packs the period's gradients with a single
``lax.switch`` over blocks (branches only gather) and runs Adam on the
packed vector, instead of one ``lax.cond`` per leaf: on CPU this compiles
about five times faster for a 70-leaf tree.

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
from blockllm_jax import _compact
from blockllm_jax import _introspect
from blockllm_jax import _layout
from blockllm_jax import _lean
from blockllm_jax import _rounding
from blockllm_jax import _sharding
from blockllm_jax import _validation

CORRECTIONS = ("sgd", "sign_sgd", "lora")
SCOPES = ("all", "partial")


class ScaleByBAdamState(NamedTuple):
  """State of :func:`scale_by_badam` and :func:`scale_by_bread`; arrays only.

  ``L`` is the number of leaves with a role (in a block, always active, or a
  BREAD adapter), ``B`` the number of blocks, ``capacity`` the coordinates
  of the always-active leaves plus those of the largest block period.
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
  leaf_index: jax.Array  # int32[L] flat position of the leaf in the params.
  selection_count: jax.Array  # int32[] blocks activated (first included).
  skipped_count: jax.Array  # int32[] steps skipped for a non-finite value.


_introspect.register_state_type(ScaleByBAdamState)


def _lora_adapter_path(path) -> bool:
  # Imported here: the optimizers do not otherwise need the models package.
  from blockllm_jax.models._lora import is_lora_path
  return is_lora_path(path)


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


def _plan(partition: _blocks.BlockPartition, correction: Optional[str],
          scope: str) -> _Plan:
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
    reached = _blocks.in_scope(position, active, scope)
    period[active] = (role == _blocks.BLOCK) & (position == active)
    if correction == "lora":
      period[active] |= (role == _blocks.ADAPTER) & reached
    if correction in ("sgd", "sign_sgd"):
      corrected[active] = (role == _blocks.BLOCK) & reached
    used = np.where(period[active], sizes, 0)
    offset[active] = np.where(always, np.cumsum(always_sizes) - always_sizes,
                              always_total + np.cumsum(used) - used)
  capacity = always_total + int(
      max((np.where(p, sizes, 0).sum() for p in period), default=0))
  if capacity > _layout._INT32_MAX:
    raise ValueError(
        f"The compact state would hold {capacity} coordinates, more than the "
        f"{_layout._INT32_MAX} that int32 offsets address; use smaller blocks.")
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
) -> optax.GradientTransformationExtraArgs:
  """BAdam (``correction=None``) or BREAD: see the public wrappers.

  One step: the schedule gives the active block ``a``; a ``lax.switch`` on
  ``a`` packs the gradients of the always-active leaves and of ``a``'s
  period into one vector of ``capacity`` coordinates (the only data-
  dependent choice, and its branches only gather); Adam runs elementwise on
  the packed vector and the moment buffers (updated in place); each leaf's
  update is then read back from its window (offsets from a static table
  indexed by ``a``) or, for a corrected leaf, formed from its gradient.
  """
  _validation.check_integer("switch_every", switch_every, 1)
  _validation.check_choice("order", order, _blocks.ORDERS)
  if layers_per_block is not None:
    _validation.check_integer("layers_per_block", layers_per_block, 1)
  _validation.check_range("b1", b1, 0.0, 1.0)
  _validation.check_range("b2", b2, 0.0, 1.0)
  _validation.check_nonnegative("eps", eps)
  _validation.check_nonnegative("eps_root", eps_root)
  _validation.check_nonnegative("weight_decay", weight_decay)
  if correction is not None:
    _validation.check_choice("correction", correction, CORRECTIONS)
    _validation.check_choice("scope", scope, SCOPES)
    _validation.check_nonnegative("correction_scale", correction_scale)
  moment_dtype = jnp.dtype(moment_dtype)
  if not jnp.issubdtype(moment_dtype, jnp.floating):
    raise ValueError(f"`moment_dtype` must be a float dtype; got {moment_dtype}.")
  rule = _blocks.resolve_rule(blocks, layers_per_block, include_embedding,
                              include_head)
  use_adapters = correction == "lora"
  use_sgd = correction in ("sgd", "sign_sgd")
  use_weight_decay = not (isinstance(weight_decay, (int, float))
                          and weight_decay == 0)
  use_adapter_scale = use_adapters and not (
      isinstance(correction_scale, (int, float)) and correction_scale == 1)

  def partition_of(tree) -> _blocks.BlockPartition:
    return _blocks.build_partition(
        tree, rule, always_active,
        _lora_adapter_path if use_adapters else None)

  def init_fn(params):
    partition = partition_of(params)
    _blocks.check_partition(partition, blocks, include_embedding,
                            include_head)
    if (use_adapters and partition.layout.paths
        and _blocks.ADAPTER not in partition.role):
      raise ValueError(
          "`correction='lora'` trains LoRA adapters, but the parameter tree "
          "has none (no leaf named `lora_a` / `lora_b`); add them with "
          "`blockllm_jax.models.add_lora` or use `correction='sgd'`.")
    plan = _sharding.init_plan(param_sharding, params)
    if plan is not None:
      # Each device packs its own shards: the plan of the local shapes.
      partition = partition_of(_sharding.local_tree(params, plan))
    capacity = _plan(partition, correction, scope).capacity
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
        mu=_sharding.zeros_buffer(capacity, moment_dtype, plan),
        nu=_sharding.zeros_buffer(capacity, moment_dtype, plan),
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
    ), plan)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    if param_sharding is None:
      return local_update(updates, state, params, value)
    mesh_plan = _sharding.update_plan(param_sharding, updates)
    lean = isinstance(updates, _lean.LeanGradients)
    tree = updates.params_like if lean else updates
    layout = partition_of(tree).layout
    reduce = _sharding.collective(mesh_plan, layout.eligible_index,
                                  layout.sizes)
    run = lambda u, s, p, v: local_update(u, s, p, v, reduce)
    if not lean:
      return _sharding.shard_update(run, mesh_plan, updates, state, params,
                                    value)
    if not layout.eligible_index:
      return layout.updates_tree(tree, []), state
    # The backward pass is the model's: it runs here, on the global view,
    # each device packing its own shards; the rest runs per device.
    local_like = _sharding.local_tree(tree, mesh_plan)
    partition = partition_of(local_like)
    plan = checked_plan(partition,
                        state.mu.shape[0] // mesh_plan.num_devices)
    schedule, adam, offset = schedule_of(state, partition, plan)
    packed, dense = lean_backward(updates, partition, adam, offset,
                                  mesh_plan)
    return _sharding.shard_lean_update(
        run, mesh_plan, _lean.PackedStep(local_like, packed, dense), state,
        params, value, eligible_index=layout.eligible_index,
        treedef=layout.treedef)

  def checked_plan(partition, held: int) -> _Plan:
    """The static tables; ``held``: moment coordinates the state holds for
    this tree (per device on a mesh)."""
    plan = _plan(partition, correction, scope)
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
        dense=[use_sgd and r == _blocks.BLOCK for r in partition.role],
        mesh_plan=mesh_plan)
    return result.packed, result.dense

  def local_update(updates, state, params, value, reduce=None):
    """The update on one device's shards (all of the params without
    sharding); ``reduce`` combines the finiteness checks across devices."""
    if use_weight_decay and params is None:
      raise ValueError("`weight_decay` > 0 needs `params` in `update`.")
    lean = isinstance(updates, (_lean.LeanGradients, _lean.PackedStep))
    tree = updates.params_like if lean else updates
    partition = partition_of(tree)
    layout = partition.layout
    if not layout.eligible_index:
      return (layout.updates_tree(tree, []) if lean else updates), state
    plan = checked_plan(partition, state.mu.shape[0])
    flat_params = (layout.treedef.flatten_up_to(params)
                   if use_weight_decay else None)
    role = partition.role

    # A step is skipped when what it uses is not finite: the loss (if
    # given), the packed gradient (Adam-trained leaves) and, for an SGD
    # correction, the gradients of the blocks. Frozen leaves' gradients do
    # not matter (the original does not even compute them).
    finite = jnp.ones([], bool)
    if value is not None:
      finite = jnp.isfinite(_validation.scalar_loss(value))

    schedule, adam, offset = schedule_of(state, partition, plan)
    always = [i for i, r in enumerate(role) if r == _blocks.ALWAYS_ACTIVE]
    if isinstance(updates, _lean.PackedStep):
      packed_grad, grads = updates.packed, updates.dense
    elif lean:
      packed_grad, grads = lean_backward(updates, partition, adam, offset)
    else:
      grads = layout.eligible_leaves(updates)

      def gather(active):
        members = always + [i for i in range(len(grads))
                            if plan.period[active, i]]
        return lambda grads: _compact.pack_leaves(
            [grads[i] for i in members], plan.capacity, moment_dtype)

      packed_grad = jax.lax.switch(
          schedule.active, [gather(b) for b in range(partition.num_blocks)],
          grads)
    if use_sgd:
      for g, r in zip(grads, role):
        if r == _blocks.BLOCK:
          finite &= jnp.all(jnp.isfinite(g))
    finite &= jnp.all(jnp.isfinite(packed_grad))
    finite = _sharding.all_true(finite, reduce)
    # Period coordinates restart at a switch; always-active ones never do.
    is_period = jnp.arange(plan.capacity) >= plan.always_total
    restart = schedule.switch & is_period
    # The moments are updated in place first and each leaf's direction is
    # read from its windows of them: a direction computed from the old
    # moments alongside would make XLA keep a copy of them all step.
    mu = jnp.where(finite, (1 - b1) * packed_grad
                   + b1 * jnp.where(restart, 0, state.mu), state.mu)
    nu = jnp.where(finite, (1 - b2) * packed_grad**2
                   + b2 * jnp.where(restart, 0, state.nu), state.nu)

    corrected = jnp.asarray(plan.corrected)[schedule.active]
    adam_now, corrected_now = adam & finite, corrected & finite
    leaf_updates = []
    for i in range(layout.num_eligible):
      shape = layout.shapes[i]
      out_dtype = jnp.promote_types(layout.dtypes[i], jnp.float32)
      # A leaf lies wholly in the always-active or in the period region.
      adam_count = jnp.where(offset[i] >= plan.always_total,
                             schedule.block_step + 1, state.count + 1)
      window = _compact.adam_direction(
          _compact.read_leaf(mu, offset[i], layout.sizes[i]),
          _compact.read_leaf(nu, offset[i], layout.sizes[i]), adam_count,
          b1, b2, eps, eps_root)
      adam_update = window.reshape(shape).astype(out_dtype)
      if use_weight_decay:
        param = flat_params[layout.eligible_index[i]]
        adam_update = adam_update + weight_decay * param.astype(out_dtype)
      if use_adapter_scale and role[i] == _blocks.ADAPTER:
        adam_update = correction_scale * adam_update
      update = jnp.where(adam_now[i], adam_update,
                         jnp.zeros(shape, out_dtype))
      if use_sgd and role[i] == _blocks.BLOCK:
        step = grads[i].astype(out_dtype)
        if correction == "sign_sgd":
          step = jnp.sign(step)
        update = jnp.where(corrected_now[i], correction_scale * step,
                           update)
      leaf_updates.append(update)

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
  block's) are not finite returns zero updates, leaves the state untouched
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
      moment_dtype=moment_dtype, param_sharding=param_sharding)


def finish(scale_by: optax.GradientTransformationExtraArgs, learning_rate,
           stochastic_rounding: bool, seed: int):
  """``scale_by`` then the learning rate, then (optionally) rounding."""
  _validation.check_learning_rate(learning_rate)
  parts = [scale_by, optax.scale_by_learning_rate(learning_rate)]
  if stochastic_rounding:
    parts.append(_rounding.stochastic_rounding(seed))
  return optax.chain(*parts)


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
) -> optax.GradientTransformationExtraArgs:
  """BAdam optimizer: :func:`scale_by_badam`, the learning rate, rounding.

  With one block holding every leaf and ``switch_every`` beyond the run,
  this is ``optax.adamw``.

  Args:
    learning_rate: a float (>= 0) or an Optax schedule.
    switch_every, order, blocks, layers_per_block, include_embedding,
      include_head, always_active, seed, b1, b2, eps, eps_root,
      weight_decay, moment_dtype, param_sharding: see
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
  return finish(
      scale_by_badam(
          switch_every, order, blocks=blocks,
          layers_per_block=layers_per_block,
          include_embedding=include_embedding, include_head=include_head,
          always_active=always_active, seed=seed, b1=b1, b2=b2, eps=eps,
          eps_root=eps_root, weight_decay=weight_decay,
          moment_dtype=moment_dtype, param_sharding=param_sharding),
      learning_rate, stochastic_rounding, seed)
