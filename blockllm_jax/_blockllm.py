"""BlockLLM: Adam on a small, changing set of parameter tensors.

References:
  Ramesh et al., "BlockLLM: Memory-Efficient Adaptation of LLMs by Selecting
  and Optimizing the Right Coordinate Blocks", 2024.
  https://arxiv.org/abs/2406.17296
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from blockllm_jax import _compact
from blockllm_jax import _engine
from blockllm_jax import _introspect
from blockllm_jax import _layout
from blockllm_jax import _lean
from blockllm_jax import _nnx
from blockllm_jax import _loss_trigger
from blockllm_jax import _sharding
from blockllm_jax import _validation


class ScaleByBlockLLMState(NamedTuple):
  """State of :func:`scale_by_blockllm`; arrays only (pickle/orbax-friendly).

  ``L`` is the number of units (eligible leaves, or with ``layer_axis``
  each layer of an eligible stacked leaf), ``capacity`` the number of
  coordinates the compact moments can hold, ``patience`` the loss window.
  """

  count: jax.Array  # int32[] finite steps taken.
  mu: jax.Array  # moment_dtype[capacity] first moments, selected leaves packed.
  nu: jax.Array  # moment_dtype[capacity] second moments, same layout.
  selected: jax.Array  # bool[L] leaf currently selected.
  offset: jax.Array  # int32[L] start of the leaf's moments in mu / nu.
  leaf_count: jax.Array  # int32[L] Adam steps since the leaf was selected.
  visit_count: jax.Array  # int32[L] selections that contained the leaf.
  leaf_index: jax.Array  # int32[L] flat position of the unit's leaf.
  loss_window: jax.Array  # float32[patience] ring buffer of finite losses.
  loss_count: jax.Array  # int32[] finite losses pushed (wrapped, see push).
  steps_since_selection: jax.Array  # int32[] steps with this selection.
  selection_count: jax.Array  # int32[] selections made (first included).
  skipped_count: jax.Array  # int32[] steps skipped for a non-finite value.
  unit_layer: jax.Array  # int32[L] the unit's layer in a stacked leaf, or -1.


_introspect.register_state_type(ScaleByBlockLLMState)


class _Selection(NamedTuple):
  """The selection part of the state, which a reselection rewrites."""

  selected: jax.Array  # bool[L]
  offset: jax.Array  # int32[L]
  leaf_count: jax.Array  # int32[L]
  visit_count: jax.Array  # int32[L]
  mu: jax.Array  # moment_dtype[capacity]
  nu: jax.Array  # moment_dtype[capacity]


class _LeanPass(NamedTuple):
  """The carry of a lean step's backward passes (one, or two to reselect)."""

  passes: jax.Array  # int32[] backward passes run.
  selected: jax.Array  # bool[L] the selection the last pass packed.
  offset: jax.Array  # int32[L] its offsets in the (local) packed buffer.
  packed: jax.Array  # moment_dtype[capacity] the last pass's packed gradient.
  norms_finite: jax.Array  # bool[] the first pass's norms are finite.
  do_select: jax.Array  # bool[] the step reselects.


class _Decision(NamedTuple):
  """What a lean step decided on the global view (replicated on a mesh)."""

  finite: jax.Array  # bool[] the step applies (loss and gradients finite)
  do_select: jax.Array  # bool[] the selection below is new
  selected: jax.Array  # bool[L] the step's selection
  offset: jax.Array  # int32[L] its offsets in the (local) packed buffer
  # After fused passes: the step's selection with its moments already
  # updated (and repacked if new); None after a packed pass.
  selection: Optional["_Selection"] = None


class _FusedPass(NamedTuple):
  """The carry of a fused lean step's backward passes (one, or a scoring
  pass then an update pass when the loss triggers a reselection)."""

  passes: jax.Array  # int32[] backward passes run.
  selection: _Selection  # the selection; its moments updated in place.
  norms_finite: jax.Array  # bool[] the scoring pass's norms are finite.
  packed_finite: jax.Array  # bool[] the update pass's gradients are finite.
  do_select: jax.Array  # bool[] the step reselected.


def _capacity(sparsity: float, layout: _layout.LeafLayout) -> int:
  """Coordinates of the compact moments: the budget, rounded up to a leaf.

  The budget is ``ceil((1 - sparsity) * N)`` for ``N`` eligible coordinates.
  A leaf larger than the budget could never be selected, so the capacity is
  rounded up to the largest eligible leaf.
  """
  if not layout.sizes:
    return 0
  total = layout.num_candidate_coordinates
  budget = math.ceil(round((1.0 - sparsity) * total, 6))
  return _engine.check_capacity(max(budget, max(layout.sizes)),
                                "raise `sparsity`")


def scale_by_blockllm(
    sparsity: float = 0.9,
    patience: int = 100,
    *,
    min_interval: Optional[int] = None,
    stall_tolerance: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    topk_fraction: float = 1.0,
    eligible: _layout.Eligible = None,
    moment_dtype: Any = "float32",
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates with Adam on a selected subset of leaves (BlockLLM).

  Each step, only the *selected* leaves (parameter tensors) receive an Adam
  direction; all other leaves receive an update of exactly zero. Adam
  moments exist only for the selected coordinates, in two flat buffers of a
  fixed size, so the state is about ``(1 - sparsity)`` of ``optax.adam``'s.

  Selection (in-graph, ``lax.cond``): on the first step and whenever the
  loss stops improving, each eligible leaf ``l`` is scored by
  ``||G_l|| / f_l``, with ``G_l`` the incoming gradient and ``f_l = 1 +`` the
  number of earlier selections that contained ``l``; leaves are taken in
  descending score order while they fit into the budget of
  ``ceil((1 - sparsity) * N)`` coordinates (``N`` = eligible coordinates),
  skipping those that do not fit (exact fill). The budget is rounded up to
  the largest eligible leaf so every leaf is reachable. The loss "stops
  improving" when it is at or above ``mean - stall_tolerance * |mean|`` of
  the last ``patience`` finite losses, and at least ``min_interval`` steps
  passed since the last selection. Leaves that stay selected keep their
  moments and bias-correction counts; new ones start from zero.

  A step whose loss or eligible gradient is not finite (a gradient counts as
  not finite from about 1.8e19 on, where its square, Adam's second moment,
  overflows float32) leaves the moments, the selection and the loss
  statistics untouched, returns zero updates and increments
  ``skipped_count``.

  Updates of parameters narrower than float32 (bf16, fp16) come back in
  float32, as from :func:`blockllm_jax.scale_by_badam`;
  :func:`blockllm_jax.blockllm` ends with
  :func:`blockllm_jax.stochastic_rounding`.

  Args:
    sparsity: fraction of eligible coordinates *not* trained, in [0, 1).
    patience: number of recent losses in the moving average (>= 1).
    min_interval: minimum steps between selections (>= 0); default
      ``patience``.
    stall_tolerance: relative tolerance under which a loss close to its
      moving average counts as not improving (>= 0).
    b1, b2: Adam decay rates, in [0, 1).
    eps, eps_root: Adam epsilons (>= 0), as in ``optax.scale_by_adam``.
    weight_decay: decoupled weight decay applied to the selected leaves
      only (>= 0); needs ``params``.
    topk_fraction: fraction of each selected leaf's coordinates that get a
      non-zero update, the largest ``|Adam direction|`` (in (0, 1]; the paper's
      optional within-layer sparsity). Moments are updated for the whole leaf.
    eligible: which leaves may ever be selected: ``None`` for every float
      leaf except embeddings and output heads (see
      :data:`blockllm_jax.DEFAULT_INELIGIBLE_PATTERN`), a predicate
      ``(path, leaf) -> bool`` or a pytree of bools like the params.
    moment_dtype: dtype of the compact moments (default float32).
    param_sharding: ``None`` (one device), or a pytree of
      ``jax.sharding.NamedSharding`` like the params: each device then keeps
      the moments of its own shards of the selected leaves (about ``1 /
      devices`` of the state; see :func:`blockllm_jax.state_sharding`), and
      selection all-reduces only per-leaf norms. Works with the full
      gradient and with :func:`blockllm_jax.lean_value_and_grad` (each
      device then packs its own gradient shards); needs
      ``topk_fraction=1`` and a Python float ``sparsity``.
    layer_axis: for models whose leaves stack their layers (``nn.scan``,
      MaxText's ``scan_layers``, Levanter's ``Stacked``): ``None`` (no
      stacking), an int (the axis of every leaf under a layer stack: a path
      component named ``layers``, ``layer``, ``h``, ``blocks``, ``block`` or
      ``stack``), a pytree like the params of ``int | None``, or a callable
      ``(path, leaf) -> int | None``. Each layer's slice of a stacked leaf
      is then a unit of its own: scored, counted against the budget and
      given moments like an unstacked leaf, so a stacked model trains as the
      same layers unstacked. With ``param_sharding`` the layer axis must
      stay whole on each device (a ``ValueError`` names the leaf
      otherwise); :func:`blockllm_jax.lean_value_and_grad` takes scanned
      layers on one device (on a mesh it raises).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its ``update`` needs the
    loss as ``value=``.

  Example:
    >>> import jax.numpy as jnp, optax, blockllm_jax
    >>> params = {'w': jnp.ones((4, 4)), 'b': jnp.zeros(4)}
    >>> tx = optax.chain(blockllm_jax.scale_by_blockllm(0.5, patience=10),
    ...                  optax.scale(-1e-3))
    >>> state = tx.init(params)
    >>> grads = {'w': jnp.ones((4, 4)), 'b': jnp.ones(4)}
    >>> updates, state = tx.update(grads, state, params, value=jnp.array(1.))

  References:
    Ramesh et al., 2024. https://arxiv.org/abs/2406.17296
  """
  _validation.check_range("sparsity", sparsity, 0.0, 1.0)
  _validation.check_integer("patience", patience, 1)
  if min_interval is None:
    min_interval = patience
  _validation.check_integer("min_interval", min_interval, 0)
  _validation.check_nonnegative("stall_tolerance", stall_tolerance)
  settings = _engine.adam_settings(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                                   weight_decay=weight_decay,
                                   moment_dtype=moment_dtype)
  _validation.check_range("topk_fraction", topk_fraction, 0.0, 1.0,
                          low_closed=False, high_closed=True)
  moment_dtype = settings.moment_dtype
  # A Python constant lets us drop the sort at trace time.
  use_topk = not (isinstance(topk_fraction, (int, float))
                  and topk_fraction == 1)
  if param_sharding is not None and use_topk:
    raise ValueError(
        "`topk_fraction` < 1 is not supported with `param_sharding` (the "
        "top-k of a leaf would need its whole direction on one device); "
        "use topk_fraction=1.0.")

  def layout_of(tree):
    return _layout.build_layout(tree, eligible, layer_axis)

  def init_fn(params):
    layout = layout_of(params)
    _layout.require_eligible(layout, eligible)
    # Shapes are fixed here; `update` reads them back from the state, so
    # under `optax.inject_hyperparams` these two may be traced there.
    capacity = _capacity(_validation.static_float("sparsity", sparsity),
                         layout)
    plan = _sharding.init_plan(param_sharding, params)
    _layout.check_sharded_layers(layout, plan)
    if plan is not None:
      local = layout_of(_sharding.local_tree(params, plan))
      capacity = _sharding.local_capacity(capacity, layout.sizes,
                                          local.sizes)
    static_patience = _validation.static_int("patience", patience, 1)
    num_leaves = layout.num_eligible
    # A fresh array per field: shared buffers could not all be donated.
    zeros_i32 = lambda: jnp.zeros([num_leaves], jnp.int32)
    scalar = lambda: jnp.zeros([], jnp.int32)
    return _sharding.place_state(ScaleByBlockLLMState(
        count=scalar(),
        mu=_sharding.zeros_buffer(capacity, moment_dtype, plan),
        nu=_sharding.zeros_buffer(capacity, moment_dtype, plan),
        selected=jnp.zeros([num_leaves], bool),
        offset=zeros_i32(),
        leaf_count=zeros_i32(),
        visit_count=zeros_i32(),
        leaf_index=jnp.asarray(layout.eligible_index, jnp.int32).reshape(-1),
        loss_window=jnp.zeros([static_patience], jnp.float32),
        loss_count=scalar(),
        steps_since_selection=scalar(),
        selection_count=scalar(),
        skipped_count=scalar(),
        unit_layer=jnp.asarray(layout.unit_layer, jnp.int32).reshape(-1),
    ), plan)

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del extra_args
    updates = _nnx.resolve(updates)  # nnx.Optimizer passes lean stand-ins on
    if value is None:
      raise _engine.missing_loss_error("BlockLLM")
    if param_sharding is None:
      return local_update(updates, state, params, value)
    tree = (updates.params_like if isinstance(updates, _lean.LeanGradients)
            else updates)
    global_capacity = _capacity(
        _validation.static_float("sparsity", sparsity), layout_of(tree))

    def run(u, s, p, v, reduce):
      return local_update(u, s, p, v, reduce, global_capacity)

    def lean_step(grads, state, layout, local_like, plan):
      # The backward pass is the model's: it runs on the global view, each
      # device packing its own shards into its slice.
      return lean_gradients(grads, layout.eligible_index, state,
                            _validation.scalar_loss(value),
                            layout_of(local_like).sizes, layout.sizes,
                            global_capacity, plan)

    return _sharding.dispatch(param_sharding, updates, state, params, value,
                              layout_of=layout_of, local_update=run,
                              lean_step=lean_step)

  def local_update(updates, state, params, value, reduce=None,
                   global_capacity=None):
    """The update on one device's shards (all of the params without
    sharding); ``reduce`` sums across devices, selection uses whole-leaf
    sizes and the global capacity. ``update_fn`` has checked ``value``."""
    _engine.require_params(settings, params)
    lean = isinstance(updates, (_lean.LeanGradients, _lean.PackedStep))
    tree = updates.params_like if lean else updates
    layout = layout_of(tree)
    if not layout.eligible_index:
      return ((layout.updates_tree(tree, []) if lean else updates),
              state)
    capacity = state.mu.shape[0]
    sizes = layout.sizes
    # The budget counts whole leaves, so every device makes the same choice.
    select_sizes = sizes if reduce is None else reduce.global_sizes
    select_capacity = capacity if reduce is None else global_capacity
    loss = _validation.scalar_loss(value)
    selection = _Selection(state.selected, state.offset, state.leaf_count,
                           state.visit_count, state.mu, state.nu)

    if isinstance(updates, _lean.LeanGradients):
      step_of = (fused_lean_step if updates.fused_capable and reduce is None
                 else lean_gradients)
      updates = step_of(updates, layout.eligible_index, state, loss,
                        sizes, select_sizes, select_capacity)
    fused = lean and updates.decision.selection is not None
    if fused:
      # Tier C: the moments were updated in the backward pass.
      decision = updates.decision
      finite, do_select = decision.finite, decision.do_select
      selection = decision.selection
    elif lean:
      # Tiers B/C: the packed gradient came in, in the layout of the
      # decided selection; the moments follow it.
      decision = updates.decision
      finite, do_select = decision.finite, decision.do_select
      chosen = (decision.selected, decision.offset)
      selection = lax.cond(do_select, lambda s: reselect(s, chosen, sizes),
                           lambda s: s, selection)
      packed = updates.packed
    else:
      # Tier A: the full gradient; any non-finite entry (or one whose square
      # overflows float32) skips the step.
      grads = layout.group_leaves(updates)
      finite = _sharding.all_true(
          jnp.isfinite(loss) & _engine.all_finite(layout, updates),
          reduce)
      do_select = finite & trigger_of(state, loss)

      def reselect_from_grads(selection):
        # The scores' norms only on steps that reselect.
        norm_sq = _sharding.leaf_sums(
            _engine.unit_norms_squared(layout, updates), reduce)
        return reselect(selection, choose(
            selection.visit_count, jnp.sqrt(norm_sq), sizes, select_sizes,
            select_capacity), sizes)

      selection = lax.cond(do_select, reselect_from_grads, lambda s: s,
                           selection)

    active = selection.selected & finite
    leaf_count = selection.leaf_count + active.astype(jnp.int32)
    units = _engine.per_unit(selection.offset, active, leaf_count, settings,
                             layout=layout, salt=state.count)
    if fused:
      mu, nu = selection.mu, selection.nu
    elif lean:
      # The packed gradient holds the selected leaves up to `used`; the
      # tail of the buffers is left as it is.
      used = jnp.sum(jnp.where(selection.selected,
                               jnp.asarray(sizes, jnp.int32), 0))
      mu, nu = _engine.update_moments(
          selection.mu, selection.nu, packed,
          (jnp.arange(capacity) < used) & finite, settings, salt=units.salt)
    else:
      mu, nu = _engine.update_unit_moments(selection.mu, selection.nu, grads,
                                           units, settings, layout)
    leaf_params = (layout.group_leaves(params)
                   if settings.use_weight_decay else None)
    directions = _engine.unit_updates(
        mu, nu, layout, units, settings, leaf_params,
        finish=keep_top if use_topk else None)

    step = finite.astype(jnp.int32)
    loss_window, loss_count = _loss_trigger.push_loss(
        state.loss_window, state.loss_count,
        jnp.where(finite, loss, jnp.nan))
    new_state = ScaleByBlockLLMState(
        count=state.count + step,
        mu=mu,
        nu=nu,
        selected=selection.selected,
        offset=selection.offset,
        leaf_count=leaf_count,
        visit_count=selection.visit_count,
        leaf_index=state.leaf_index,
        loss_window=loss_window,
        loss_count=loss_count,
        steps_since_selection=jnp.where(do_select, 0,
                                        state.steps_since_selection) + step,
        selection_count=state.selection_count + do_select.astype(jnp.int32),
        skipped_count=state.skipped_count + (1 - step),
        unit_layer=state.unit_layer,
    )
    return layout.updates_tree(tree, directions), new_state

  def reselect(selection, chosen, sizes):
    """The new selection's state: kept leaves keep their moments and
    counts (moved in place to their new offsets), new ones start at zero."""
    new_selected, new_offset = chosen
    kept = selection.selected & new_selected
    fresh = new_selected & ~selection.selected
    mu, nu = _compact.repack((selection.mu, selection.nu), sizes,
                             selection.offset, new_offset, kept, fresh)
    return _Selection(
        selected=new_selected, offset=new_offset,
        leaf_count=jnp.where(kept, selection.leaf_count, 0),
        visit_count=selection.visit_count + new_selected.astype(jnp.int32),
        mu=mu, nu=nu)

  def trigger_of(state, loss):
    """bool[]: the selection is revised this step (first step, or the loss
    stopped improving)."""
    return (state.selection_count == 0) | (
        _loss_trigger.loss_improvement_stalled(
            state.loss_window, state.loss_count, loss,
            state.steps_since_selection, min_interval, stall_tolerance))

  def choose(visit_count, norms, sizes, select_sizes, select_capacity):
    """The new selection (bool[leaves]) and its offsets (int32[leaves]).

    ``select_sizes`` / ``select_capacity`` are whole-leaf sizes and the
    global budget (so every device chooses the same); ``sizes`` are what
    the moment buffers hold of each leaf (a device's shard on a mesh).
    """
    scores = norms / (1 + visit_count).astype(jnp.float32)
    new_selected = _compact.greedy_fill(
        scores, jnp.asarray(select_sizes, jnp.int32), select_capacity)
    return new_selected, _compact.packed_offsets(
        new_selected, jnp.asarray(sizes, jnp.int32))

  def keep_top(unit, update):
    """The paper's within-leaf sparsity: a sort, so only for active leaves."""
    flat = update.reshape(-1)
    return lax.cond(
        unit.active,
        lambda: _compact.keep_top_fraction(flat, topk_fraction),
        lambda: jnp.zeros_like(flat)).reshape(update.shape)

  def lean_gradients(grads, leaves, state, loss, sizes, select_sizes,
                     select_capacity, mesh_plan=None):
    """Tiers B/C: run the deferred backward pass for what this step uses.

    The backward pass runs once on most steps and twice on a step that
    reselects: the first pass packs the selected leaves' gradients and,
    when the loss triggers a reselection, also reduces every eligible
    leaf's gradient to its norm; if the step does reselect, the second pass
    packs the new selection's gradients. With compute-lean layers both
    passes are one ``lax.while_loop`` on the forward pass's activations (a
    loop reads them, it does not copy them), so the program holds the
    model's backward pass once; with gradient-lean taps only, the second
    pass recomputes the forward pass inside a ``lax.cond``. The moments
    are not touched here: on a mesh this runs on the global view, and the
    engine's update per device.

    Returns:
      A ``_lean.PackedStep`` (without ``params_like``): the packed gradient
      in the layout of the step's selection, that selection, whether it is
      new, and whether the step is finite.
    """
    finite_loss = jnp.isfinite(loss)
    trigger = trigger_of(state, loss)

    def backward(carry: _LeanPass, source=grads) -> _LeanPass:
      first = carry.passes == 0
      result = source.backward(leaves, packed=carry.selected,
                              offset=carry.offset,
                              norms=jnp.full([len(leaves)], trigger & first),
                              mesh_plan=mesh_plan)
      norms_finite = jnp.all(jnp.isfinite(result.norm_sq))
      do_select = first & finite_loss & trigger & norms_finite
      chosen_selected, chosen_offset = choose(
          state.visit_count, jnp.sqrt(result.norm_sq), sizes, select_sizes,
          select_capacity)
      return _LeanPass(
          passes=carry.passes + 1,
          selected=jnp.where(do_select, chosen_selected, carry.selected),
          offset=jnp.where(do_select, chosen_offset, carry.offset),
          packed=result.packed,
          norms_finite=jnp.where(first, norms_finite, carry.norms_finite),
          do_select=carry.do_select | do_select)

    def another_pass(carry: _LeanPass) -> jax.Array:
      return (carry.passes == 0) | ((carry.passes == 1) & carry.do_select)

    start = _LeanPass(
        passes=jnp.zeros([], jnp.int32), selected=state.selected,
        offset=state.offset,
        packed=grads.zeros_packed(mesh_plan),
        norms_finite=jnp.ones([], bool), do_select=jnp.zeros([], bool))
    if grads.compute_lean:
      done = lax.while_loop(another_pass, backward, start)
    else:
      # Gradient-lean taps only: inside a loop body XLA keeps every tapped
      # leaf's gradient alive at once (measured: as much as the plain
      # step), so the first pass runs outside, and a reselecting step
      # recomputes the forward pass for its second backward pass.
      done = backward(start)
      done = lax.cond(
          another_pass(done),
          lambda carry: backward(carry, grads.recompute()),
          lambda carry: carry, done)
    packed_finite = _engine.usable(done.packed)
    # A new selection applies only if its gradients are finite (a skipped
    # step changes nothing). This data dependency also orders the moments'
    # repack after the backward pass, whose peak it would otherwise add its
    # temporaries to.
    return _lean.PackedStep(
        params_like=None, packed=done.packed, decision=_Decision(
            finite=finite_loss & (done.norms_finite | ~trigger)
            & packed_finite,
            do_select=done.do_select & packed_finite, selected=done.selected,
            offset=done.offset))

  def fused_lean_step(grads, leaves, state, loss, sizes, select_sizes,
                      select_capacity):
    """Tier C on one device: the moments are updated in the backward pass.

    Each selected leaf's gradient is folded into its windows of ``mu`` /
    ``nu`` as the backward pass produces it, so no packed gradient exists.
    A step the loss triggers runs a scoring pass first (every eligible
    leaf's norm, nothing written), reselects (moments repacked in place),
    then the update pass; other steps run the update pass only. Both are
    one ``lax.while_loop`` on the forward pass's activations. A non-finite
    loss writes nothing; a leaf whose gradient is not finite keeps its
    moments, and the step is skipped (parameters, counts and selection
    unchanged), though the selected leaves with finite gradients have
    taken this gradient into their moments: the price of not holding a
    copy (a step whose loss is finite but whose gradient is not).

    Returns:
      A ``_lean.PackedStep`` (no ``params_like``, no packed gradient) whose
      decision holds the updated selection.
    """
    finite_loss = jnp.isfinite(loss)
    trigger = trigger_of(state, loss)
    start = _FusedPass(
        passes=jnp.zeros([], jnp.int32),
        selection=_Selection(state.selected, state.offset, state.leaf_count,
                             state.visit_count, state.mu, state.nu),
        norms_finite=jnp.ones([], bool), packed_finite=jnp.ones([], bool),
        do_select=jnp.zeros([], bool))

    def backward(carry: _FusedPass) -> _FusedPass:
      scoring = (carry.passes == 0) & trigger
      selection = carry.selection
      write = selection.selected & finite_loss & carry.norms_finite & ~scoring
      result = grads.backward(
          leaves, packed=write, offset=selection.offset,
          norms=jnp.full([len(leaves)], scoring),
          moments=(selection.mu, selection.nu), adam=settings, salt=state.count)
      all_finite = jnp.all(jnp.isfinite(result.norm_sq))
      selection = selection._replace(mu=result.moments[0],
                                     nu=result.moments[1])
      do_select = scoring & finite_loss & all_finite
      chosen = choose(state.visit_count, jnp.sqrt(result.norm_sq), sizes,
                      select_sizes, select_capacity)
      selection = lax.cond(do_select, lambda s: reselect(s, chosen, sizes),
                           lambda s: s, selection)
      return _FusedPass(
          passes=carry.passes + 1, selection=selection,
          norms_finite=jnp.where(scoring, all_finite, carry.norms_finite),
          packed_finite=jnp.where(scoring, carry.packed_finite, all_finite),
          do_select=carry.do_select | do_select)

    def another_pass(carry: _FusedPass) -> jax.Array:
      return (carry.passes == 0) | ((carry.passes == 1) & trigger & finite_loss
                                    & carry.norms_finite)

    done = lax.while_loop(another_pass, backward, start)
    finite = finite_loss & done.norms_finite & done.packed_finite
    return _lean.PackedStep(
        params_like=None, packed=None, decision=_Decision(
            finite=finite, do_select=done.do_select,
            selected=done.selection.selected, offset=done.selection.offset,
            selection=done.selection))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def blockllm(
    learning_rate: optax.ScalarOrSchedule,
    *,
    sparsity: float = 0.9,
    patience: int = 100,
    min_interval: Optional[int] = None,
    stall_tolerance: float = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    topk_fraction: float = 1.0,
    eligible: _layout.Eligible = None,
    moment_dtype: Any = "float32",
    stochastic_rounding: bool = True,
    seed: int = 0,
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """BlockLLM optimizer: :func:`scale_by_blockllm`, the learning rate, rounding.

  With ``weight_decay`` this is AdamW restricted to the selected leaves; at
  ``sparsity=0`` with every leaf eligible it equals ``optax.adamw``.

  Args:
    learning_rate: a float (>= 0) or an Optax schedule.
    sparsity, patience, min_interval, stall_tolerance, b1, b2, eps, eps_root,
      weight_decay, topk_fraction, eligible, moment_dtype, param_sharding,
      layer_axis: see :func:`scale_by_blockllm`.
    stochastic_rounding: end with :func:`blockllm_jax.stochastic_rounding`
      (seeded with ``seed``), so that updates of bf16 / fp16 parameters,
      which come back in float32, are rounded stochastically instead of to
      nearest. No effect on float32 parameters; costs a ``uint32[2]`` key.
    seed: seed of the stochastic rounding.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass the loss to ``update``
    as ``value=``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, blockllm_jax
    >>> params = {'layer': {'kernel': jnp.ones((8, 8))}}
    >>> loss_fn = lambda p: jnp.sum(p['layer']['kernel'] ** 2)
    >>> tx = blockllm_jax.blockllm(1e-2, sparsity=0.5, patience=5)
    >>> state = tx.init(params)
    >>> loss, grads = jax.value_and_grad(loss_fn)(params)
    >>> updates, state = tx.update(grads, state, params, value=loss)
    >>> params = optax.apply_updates(params, updates)

  References:
    Ramesh et al., 2024. https://arxiv.org/abs/2406.17296
  """
  return _engine.with_learning_rate(
      scale_by_blockllm(
          sparsity, patience, min_interval=min_interval,
          stall_tolerance=stall_tolerance, b1=b1, b2=b2, eps=eps,
          eps_root=eps_root, weight_decay=weight_decay,
          topk_fraction=topk_fraction, eligible=eligible,
          moment_dtype=moment_dtype, param_sharding=param_sharding,
          layer_axis=layer_axis),
      learning_rate, stochastic_rounding, seed)
