"""The packed-moment Adam engine shared by BlockLLM, BAdam and BREAD.

The three optimizers differ only in *which* parameter units (leaves) are
trained in a step; a selection policy (:mod:`blockllm_jax._blockllm`,
:mod:`blockllm_jax._badam`) decides that, and this engine does the rest:

1. the moments: :func:`update_unit_moments` updates each active unit's
   windows of the two flat moment buffers in place, straight from its
   gradient (no packed copy of the gradients exists); with the lean taps
   of :mod:`blockllm_jax._lean`, which hand over the gradients already
   packed, :func:`update_moments` updates the whole buffer at once, and
   the lean backward pass itself calls :func:`update_window_moments` for
   each gradient as it arrives (no packed gradient at all); moments
   narrower than float32 are computed in float32 and rounded
   stochastically;
2. :func:`unit_updates`: each unit's bias-corrected direction is read back
   from its window of the moments (zero for inactive units), then finished
   by the policy (weight decay, top-k, a correction).

The units of a stacked leaf (``layer_axis``: one unit per layer) are one
group: a ``lax.fori_loop`` over its layers updates one layer's moments per
iteration, reading the layer's slice of the gradient, and the stacked
update is one elementwise expression over the moment windows gathered by
position (which XLA fuses into the parameter update; a loop again when a
policy finishes each unit, e.g. top-k), so a scanned model's step does
not grow with its depth.

There is no ``lax.cond`` per unit. What the program costs to compile is set
by the number of *distinct* kernels, and XLA reuses one compiled kernel for
all fusions that are identical, e.g. the same projection in every layer.
A unit's scalars (offset, active flag, bias corrections) read as slices of
a vector would make each unit's kernel unique (the slice position is a
constant inside it); :func:`per_unit` therefore splits those vectors into
separate scalar buffers with variadic reductions, so the per-unit
kernels of same-shaped units are the same kernel and the step compiles in
time close to AdamW's.

References:
  Kingma and Ba, "Adam: A Method for Stochastic Optimization", 2015.
  https://arxiv.org/abs/1412.6980
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from blockllm_jax import _compact
from blockllm_jax import _layout
from blockllm_jax import _rounding
from blockllm_jax import _validation


class AdamSettings(NamedTuple):
  """Validated Adam hyperparameters of a block optimizer (Python values)."""

  b1: Any
  b2: Any
  eps: Any
  eps_root: Any
  weight_decay: Any
  moment_dtype: Any  # a float jnp.dtype

  @property
  def use_weight_decay(self) -> bool:
    """False only for a Python zero, so that the term is dropped at trace time."""
    return not _python_zero(self.weight_decay)

  @property
  def use_eps_root(self) -> bool:
    """False only for a Python zero (the default): no ``+ 0`` per unit."""
    return not _python_zero(self.eps_root)

  @property
  def positive_denominator(self) -> bool:
    """True if ``sqrt(nu_hat + eps_root) + eps`` cannot be 0: ``eps`` or
    ``eps_root`` is a Python number above 0 (the default ``eps``). With
    both 0, a zero ``nu`` gives ``0 / 0``: NaN for an active unit's zero
    gradient coordinates, as in ``optax.adam``, and for an inactive unit
    reading such a window, unless selected away."""
    return _python_positive(self.eps) or _python_positive(self.eps_root)


def _python_zero(value) -> bool:
  return isinstance(value, (int, float)) and value == 0


def _python_positive(value) -> bool:
  return isinstance(value, (int, float)) and value > 0


def adam_settings(*, b1, b2, eps, eps_root, weight_decay,
                  moment_dtype) -> AdamSettings:
  """Checks the arguments every block optimizer shares.

  Raises:
    ValueError: naming the argument and its accepted range.
  """
  _validation.check_range("b1", b1, 0.0, 1.0)
  _validation.check_range("b2", b2, 0.0, 1.0)
  _validation.check_nonnegative("eps", eps)
  _validation.check_nonnegative("eps_root", eps_root)
  _validation.check_nonnegative("weight_decay", weight_decay)
  try:
    moment_dtype = jnp.dtype(moment_dtype)
  except TypeError:
    raise ValueError(
        f"`moment_dtype` must be a float dtype; got {moment_dtype!r}.") from None
  if not jnp.issubdtype(moment_dtype, jnp.floating):
    raise ValueError(f"`moment_dtype` must be a float dtype; got {moment_dtype}.")
  return AdamSettings(b1, b2, eps, eps_root, weight_decay, moment_dtype)


def check_capacity(capacity: int, remedy: str) -> int:
  """Raises a ``ValueError`` if int32 offsets cannot address ``capacity``."""
  if capacity > _layout._INT32_MAX:
    raise ValueError(
        f"The compact state would hold {capacity} coordinates, more than the "
        f"{_layout._INT32_MAX} that int32 offsets address; {remedy}.")
  return capacity


def require_params(settings: AdamSettings, params) -> None:
  if settings.use_weight_decay and params is None:
    raise ValueError("`weight_decay` > 0 needs `params` in `update`.")


def update_dtype(param_dtype) -> jnp.dtype:
  """Updates come back in float32 for narrower parameters (bf16, fp16), so
  that the learning rate and the final (stochastic) rounding act on the
  exact value; in the parameter dtype otherwise."""
  return jnp.promote_types(param_dtype, jnp.float32)


def traced_once(num_static: int) -> Callable:
  """Decorates ``fn(*static, *arrays)``, a per-unit piece of a step, so
  that it is traced once per distinct statics and argument shapes: a
  ``jax.jit`` whose jaxpr every same-shaped unit (the same projection in
  every layer) reuses, instead of tracing and lowering the same function
  once per unit. XLA inlines the calls, so the compiled program is the
  same. Falls back to a plain call where the statics are not hashable
  (e.g. Adam settings traced by ``optax.inject_hyperparams``)."""

  def decorate(fn: Callable) -> Callable:
    jitted = jax.jit(fn, static_argnums=tuple(range(num_static)))

    @functools.wraps(fn)
    def call(*args):
      try:
        hash(args[:num_static])
      except TypeError:
        return fn(*args)
      return jitted(*args)

    return call

  return decorate


class Unit(NamedTuple):
  """One unit's scalars as separate arrays (see :func:`per_unit`)."""

  # int32[] start of the unit's window in the buffers; may be -1 for an
  # inactive unit (see :func:`per_unit`): reads and writes clamp it to 0.
  offset: jax.Array
  active: jax.Array  # bool[] trained with Adam in this step.
  scale1: jax.Array  # float32[] 1 / (1 - b1**count) for mu; 0 if inactive.
  scale2: jax.Array  # float32[] 1 / (1 - b2**count), nu's bias correction.
  flag: Optional[jax.Array] = None  # bool[] a policy's extra per-unit flag.
  restart: Optional[jax.Array] = None  # bool[] moments restart this step.


def split_rows(vectors: Sequence[jax.Array]) -> list:
  """``[[v[i] for v in vectors] for i in range(n)]`` as separate buffers.

  The vectors (int32 or float32) become the columns of an ``[n, k]``
  matrix split by :func:`split_matrix`. A row with float columns is
  reinterpreted as floats once, not once per float column (per unit,
  each conversion is an instruction XLA compiles).
  """
  if int(vectors[0].shape[0]) == 0:
    return []
  is_int = [v.dtype == jnp.int32 for v in vectors]
  as_int = [v if integer else
            lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
            for v, integer in zip(vectors, is_int)]
  out = []
  for row in split_matrix(jnp.stack(as_int, axis=1)):
    floats = (None if all(is_int) else
              lax.bitcast_convert_type(row, jnp.float32))
    out.append([lax.index_in_dim(row if integer else floats, k,
                                 keepdims=False)
                for k, integer in enumerate(is_int)])
  return out


# Outputs per variadic reduction in ``split_matrix``. XLA:GPU gives each
# output of such a reduction shared memory of its own: with all 219 units
# of a 24-layer model in one reduction, ptxas refused BAdam's step on an
# H200 (912 KiB of shared data, about 4.2 KiB per output; 227 KiB
# allowed). In chunks of 32 (about 135 KiB at that rate) the same step
# compiled and ran there.
_SPLIT_CHUNK = 32


def _add_each(xs, ys):
  return tuple(x + y for x, y in zip(xs, ys))


def split_matrix(matrix: jax.Array, *, as_bits: bool = True) -> list:
  """The rows of an int32 or float32 ``[n, k]`` matrix as separate buffers.

  A variadic reduction over masked copies of the matrix yields row ``i``
  as output ``i``: a kernel whose outputs are separate arrays (each the sum
  of one row and zeros, hence exact), instead of ``n`` slices that XLA
  would fuse into, and so make distinct, every consumer's kernel. A
  reduction has at most ``_SPLIT_CHUNK`` outputs; more rows are split in
  two stages (:func:`_split`), so that the program holds two distinct
  reduction kernels, not one per chunk of rows.

  Args:
    matrix: the int32 or float32 ``[n, k]`` matrix.
    as_bits: sum a float matrix as its int32 bits (exact for every value);
      ``False`` sums the floats themselves, exact for all but ``-0.0`` and
      NaN payloads, and spares each row a conversion back (which becomes a
      kernel of its own where the row feeds a ``lax.cond``).
  """
  if int(matrix.shape[0]) == 0:
    return []
  bits = matrix.dtype != jnp.int32 and as_bits
  if bits:
    matrix = lax.bitcast_convert_type(matrix.astype(jnp.float32), jnp.int32)
  rows = _split(matrix)
  if not bits:
    return rows
  return [lax.bitcast_convert_type(row, jnp.float32) for row in rows]


def _split(matrix: jax.Array) -> list:
  """:func:`split_matrix` of an int32 or float32 matrix, without bits.

  Up to ``_SPLIT_CHUNK`` rows: one reduction. More: the rows, padded to
  groups of ``lanes`` rows (about the square root of their number, at
  most ``_SPLIT_CHUNK``), are first reduced over the position within a
  group (output ``r``: row ``r`` of every group, ``[groups, k]``), then
  each of those is split alike (the same kernel for every ``r``),
  recursively beyond ``_SPLIT_CHUNK**2`` rows. Square-ish stages keep
  the number of reductions and of padding rows small.
  """
  n, k = matrix.shape
  if n <= _SPLIT_CHUNK:
    return list(_masked_sums(matrix, axis=0))
  lanes = min(_SPLIT_CHUNK, math.isqrt(n - 1) + 1)
  groups = -(-n // lanes)
  padded = jnp.pad(matrix, ((0, groups * lanes - n), (0, 0)))
  rows = [None] * (groups * lanes)
  for lane, column in enumerate(
      _masked_sums(padded.reshape(groups, lanes, k), axis=1)):
    rows[lane::lanes] = _split(column)
  return rows[:n]


def _masked_sums(x: jax.Array, axis: int) -> tuple:
  """Output ``i``: the sum over ``axis`` of ``x`` where its index along
  ``axis`` is ``i`` (``x``'s slice ``i``), as one variadic reduction."""
  # The barrier ties the masks to the data: inside a loop XLA would hoist
  # each loop-invariant ``iota == i`` out of the reduction into a kernel of
  # its own (a distinct kernel per output).
  x, iota = lax.optimization_barrier(
      (x, lax.broadcasted_iota(jnp.int32, x.shape, axis)))
  operands = tuple(lax.select(iota == i, x, jnp.zeros_like(x))
                   for i in range(x.shape[axis]))
  zeros = tuple(jnp.zeros([], x.dtype) for _ in operands)
  return tuple(lax.reduce(operands, zeros, _add_each, (axis,)))


class Units(NamedTuple):
  """A step's per-unit values: vectors over all units, and separate scalar
  buffers (:class:`Unit`) for the units that are not layers of a stack."""

  vectors: Unit  # each field [U] (or None)
  scalars: dict  # unit index -> Unit, for unstacked units
  salt: Optional[jax.Array] = None  # int32[] step seed of moment rounding

  def at(self, unit) -> Unit:
    """Unit ``unit``'s values: its scalars, or (an index inside a loop over
    a stack's layers) read from the vectors."""
    if isinstance(unit, int) and unit in self.scalars:
      return self.scalars[unit]
    v = self.vectors
    pick = lambda x: None if x is None else x[unit]
    return Unit(offset=v.offset[unit], active=v.active[unit],
                scale1=v.scale1[unit], scale2=v.scale2[unit],
                flag=pick(v.flag), restart=pick(v.restart))


def per_unit(offset: jax.Array, active: jax.Array, count: jax.Array,
             settings: AdamSettings, flag: Optional[jax.Array] = None,
             restart: Optional[jax.Array] = None, *,
             layout: _layout.LeafLayout,
             salt: Optional[jax.Array] = None) -> Units:
  """The per-unit values of one step.

  Args:
    offset: int32[U] start of each unit's window in the moment buffers.
    active: bool[U] units trained with Adam in this step (False for every
      unit of a skipped step). A step-wide flag such as finiteness belongs
      in here, not in a scalar next to the units: XLA would fuse its
      computation into, and so repeat it in, every unit's kernel.
    count: int32[U] Adam steps of each unit including this one (>= 1 where
      active); bias corrections are computed for all units at once.
    settings: the Adam hyperparameters.
    flag: optional bool[U] the policy reads per unit (e.g. BREAD's SGD
      correction).
    restart: optional bool[U]: units whose moments restart from zero.
    layout: the units' layout; units that are layers of a stacked leaf get
      no scalars of their own (a loop over the layers reads the vectors).
    salt: int32[] a value that differs between steps (the step count): the
      seed of the stochastic rounding of moments narrower than float32.
  """
  count = jnp.maximum(count, 1)  # inactive units: a harmless correction
  # Reciprocals here, for all units at once: XLA rewrites ``m / c`` as
  # ``m * (1 / c)`` and would give each unit's ``1 / c`` a kernel of its own.
  # An inactive unit's is 0, so that its direction is exactly zero without
  # a select per unit (``_unit_update``): whatever window it reads holds
  # finite moments (float16 ones saturate at their largest value when
  # rounded, ``_rounding.round_with_bits``), and with ``eps`` or
  # ``eps_root`` above 0 the quotient it multiplies is finite too.
  scale1 = jnp.where(active, 1 / (1 - settings.b1**count).astype(jnp.float32),
                     0)
  scale2 = 1 / (1 - settings.b2**count).astype(jnp.float32)
  vectors = Unit(offset=offset.astype(jnp.int32), active=active,
                 scale1=scale1, scale2=scale2, flag=flag, restart=restart)
  singles = [g.start for g in layout.groups() if g.axis is None]
  if not singles:
    return Units(vectors, {}, salt)
  index = np.asarray(singles)
  # An inactive unit's offset is -1: one column fewer to split, and its
  # flag comes back as one comparison; its reads and writes are clamped to
  # the window at 0, which it writes back as it was.
  ints = [jnp.where(active, vectors.offset, -1)[index]]
  optional = [v for v in (flag, restart) if v is not None]
  ints += [v.astype(jnp.int32)[index] for v in optional]
  scalars = {}
  for unit, row in zip(singles, split_rows([scale1[index], scale2[index]]
                                           + ints)):
    extra = iter(row[3:])
    scalars[unit] = Unit(
        offset=row[2], active=row[2] >= 0, scale1=row[0], scale2=row[1],
        flag=next(extra) > 0 if flag is not None else None,
        restart=next(extra) > 0 if restart is not None else None)
  return Units(vectors, scalars, salt)


def _layer_loop(group: _layout.UnitGroup, body, carry):
  """``carry = body(k, unit, layer, carry)`` for each unit ``k`` of a
  stacked group, as one ``lax.fori_loop`` (one copy of the body, whatever
  the number of layers)."""
  layers = jnp.asarray(group.layers, jnp.int32)

  def step(k, carry):
    return body(k, group.start + k, layers[k], carry)

  return lax.fori_loop(0, group.stop - group.start, step, carry)


def _moments(grad, mu, nu, settings: AdamSettings, restart=None):
  """Adam's moment update, elementwise; ``restart`` zeroes the old moments.

  Written as ``m + (1 - b) * (g - m)``, optax's ``(1 - b) * g + b * m``
  rearranged (the two round differently, by about an ulp): one constant,
  broadcast and product fewer per moment and unit, whose instructions are
  what XLA's passes spend their time on. With the lean pass's plain squared
  norm (``_lean._reduce_into``), 6% of the lean step's instructions; in
  optax's form XLA would share the norm's ``g * g`` with the second
  moment's and give it a kernel of its own per leaf.
  """
  if restart is not None:
    mu = jnp.where(restart, 0, mu)
    nu = jnp.where(restart, 0, nu)
  return (mu + (1 - settings.b1) * (grad - mu),
          nu + (1 - settings.b2) * (grad * grad - nu))


def _wide(dtype) -> jnp.dtype:
  """The dtype moments are computed in: float32, or the moments' if wider."""
  return jnp.promote_types(dtype, jnp.float32)


def _store(new, old, apply, position, salt, stream: int):
  """``where(apply, new, old)`` in ``old``'s dtype. A moment narrower than
  float32 is rounded stochastically (unbiased): rounded to nearest, a
  bfloat16 ``nu`` stops moving once ``(1 - b2) g**2`` falls below half its
  ulp (b2 = 0.999: at about half its steady value) and never decays."""
  dtype = old.dtype
  if jnp.dtype(dtype).itemsize < 4 and salt is not None:
    # The fused lean pass carries the salt in float32: exact below 2**24.
    new = _rounding.round_with_bits(new, dtype, _rounding.hashed_bits(
        position(), salt % (1 << 24), stream=stream))
  return _where(apply, new.astype(dtype), old)


def _where(flag, on_true, on_false):
  """``jnp.where`` for a scalar or full-shape ``flag`` without the
  broadcasts and nested ``jit`` that it traces (per unit, they add up)."""
  return lax.select_n(flag, on_false, on_true)


@traced_once(num_static=1)
def _unit_moments(settings: AdamSettings, mu, nu, grad, unit: Unit, salt):
  """One unit's windows of ``mu`` / ``nu`` updated from its gradient, in
  place (an inactive unit writes back what it read)."""
  flat = grad.reshape(-1).astype(_wide(mu.dtype))
  size = flat.shape[0]
  old_mu = _compact.read_leaf(mu, unit.offset, size)
  old_nu = _compact.read_leaf(nu, unit.offset, size)
  new_mu, new_nu = _moments(flat, old_mu.astype(flat.dtype),
                            old_nu.astype(flat.dtype), settings, unit.restart)
  position = lambda: unit.offset + lax.iota(jnp.int32, size)
  mu = _compact.write_leaf(
      mu, _store(new_mu, old_mu, unit.active, position, salt, 0), unit.offset)
  nu = _compact.write_leaf(
      nu, _store(new_nu, old_nu, unit.active, position, salt, 1), unit.offset)
  return mu, nu


def update_window_moments(mu: jax.Array, nu: jax.Array, grad: jax.Array,
                          offset: jax.Array, apply: jax.Array,
                          settings: AdamSettings,
                          salt: Optional[jax.Array] = None):
  """One gradient's windows of ``mu`` / ``nu`` (at ``offset``) updated in
  place where ``apply``: the same arithmetic as :func:`update_unit_moments`,
  called by the lean backward pass as each gradient arrives."""
  unit = Unit(offset=offset, active=apply, scale1=None, scale2=None)
  return _unit_moments(settings, mu, nu, grad, unit, salt)


def update_unit_moments(mu: jax.Array, nu: jax.Array,
                        grads: Sequence[jax.Array], units: Units,
                        settings: AdamSettings,
                        layout: _layout.LeafLayout):
  """Adam's moment update straight from each unit's gradient, in place.

  Each active unit's windows of ``mu`` / ``nu`` are read, updated with its
  gradient and written back; an inactive unit (or a skipped step) writes
  back what it read, so no shape depends on the data. No packed copy of
  the gradients is ever made. The layers of a stacked leaf are one
  ``lax.fori_loop`` that reads each layer's slice of the gradient.

  Args:
    mu, nu: the moment buffers.
    grads: one gradient per group of ``layout`` (a stacked group's whole
      leaf).
    units: the step's per-unit values (:func:`per_unit`; ``restart``
      honoured).
    settings: the Adam hyperparameters.
    layout: the units' layout.

  Returns:
    ``(mu, nu)``.
  """
  for group, grad in zip(layout.groups(), grads, strict=True):
    if group.axis is None:
      mu, nu = _unit_moments(settings, mu, nu, grad, units.at(group.start),
                             units.salt)
      continue

    def body(k, unit, layer, buffers, grad=grad, axis=group.axis):
      del k
      return _unit_moments(
          settings, *buffers,
          lax.dynamic_index_in_dim(grad, layer, axis, False), units.at(unit),
          units.salt)

    mu, nu = _layer_loop(group, body, (mu, nu))
  return mu, nu


def finite_flags(grads: Sequence[jax.Array]) -> jax.Array:
  """bool[L]: each gradient is usable, finite with squares that fit float32
  (:func:`usable_peaks`).

  Written as a test of ``max |g|`` (XLA's max propagates NaN): one
  reduction to a scalar per leaf, where ``all(isfinite(g))`` lowers to a
  predicate reduction that XLA:CPU splits into several kernels and
  temporaries (about half the program and compile time for this check).
  """
  if not grads:
    return jnp.zeros([0], bool)
  return usable_peaks(jnp.stack([_max_abs(grad) for grad in grads]))


def usable_peaks(peaks: jax.Array) -> jax.Array:
  """Each ``max |g|`` is finite and so is its square.

  Adam squares every gradient into ``nu``: a finite gradient past
  ``sqrt(float32 max)`` (about 1.8e19) would make ``nu`` infinite, and the
  moment update ``nu + (1 - b2) * (g**2 - nu)`` NaN one step later. Such a
  step is skipped like a non-finite one (the fused lean pass, which gates
  on each leaf's squared norm, does the same).
  """
  return jnp.isfinite(peaks * peaks)


def usable(x: jax.Array) -> jax.Array:
  """bool[]: ``x`` is finite and its squares fit float32
  (:func:`usable_peaks`)."""
  return usable_peaks(_max_abs(x))


def _max_abs(x, axes=None):
  """float32 ``max |x|`` over ``axes`` (None: all); NaN if any is NaN."""
  return jnp.max(jnp.abs(x), axis=axes).astype(jnp.float32)


def finite_units(layout: _layout.LeafLayout, tree) -> jax.Array:
  """bool[U]: each unit's part of ``tree`` is usable (as
  :func:`finite_flags`; one reduction per stacked leaf). For a step that
  needs only whether all are, :func:`all_finite` compiles faster."""
  return usable_peaks(layout.unit_reduce(tree, _max_abs))


def all_finite(layout: _layout.LeafLayout, tree) -> jax.Array:
  """bool[]: every unit's part of ``tree`` is usable (:func:`usable_peaks`).

  Same-shaped leaves (the same projection in every layer) are combined
  elementwise, ``max(|a|, |b|, ...)`` (NaN propagates), and reduced once:
  one kernel per distinct shape instead of a reduction per unit, whose
  kernels and results were a tenth of a plain BlockLLM step's program. A
  stacked leaf counts as one leaf of its full shape; one that holds only
  some eligible layers is reduced per layer.

  A per-unit mask (BAdam checks the Adam-trained units only) does not
  belong in here: XLA gives each masked leaf a kernel of its own that
  recomputes the mask, slower to compile than :func:`finite_units`.
  """
  classes, peaks = {}, []
  for group, leaf in zip(layout.groups(), layout.group_leaves(tree)):
    if group.axis is not None and not layout.whole_stack(group):
      axes = tuple(i for i in range(leaf.ndim) if i != group.axis)
      peaks.append(jnp.max(_max_abs(leaf, axes)[np.asarray(group.layers)]))
      continue
    classes.setdefault(leaf.shape, []).append(
        jnp.abs(leaf).astype(jnp.float32))
  for magnitudes in classes.values():
    peaks.append(jnp.max(functools.reduce(jnp.maximum, magnitudes)))
  if not peaks:
    return jnp.ones([], bool)
  return jnp.all(usable_peaks(jnp.stack(peaks)))


def unit_norms_squared(layout: _layout.LeafLayout, tree) -> jax.Array:
  """float32[U]: each unit's squared norm (one reduction per stacked leaf)."""
  return layout.unit_reduce(tree, squared_norm)


def squared_norm(x: jax.Array, axes=None) -> jax.Array:
  """float32 ``sum(x**2)`` over ``axes`` (None: all); not finite if any
  entry is not (or the sum overflows)."""
  x = x.astype(jnp.float32)
  return jnp.sum(x * x, axis=axes)


def update_moments(mu: jax.Array, nu: jax.Array, packed: jax.Array,
                   apply: jax.Array, settings: AdamSettings,
                   restart: Optional[jax.Array] = None,
                   salt: Optional[jax.Array] = None):
  """Adam's moment update of the whole buffer from a packed gradient (the
  lean taps' output), in place.

  Args:
    mu, nu: the moment buffers.
    packed: the packed gradient (moment dtype, same layout).
    apply: bool[] or bool[capacity]: where the moments change (a skipped
      step changes nothing).
    settings: the Adam hyperparameters.
    restart: optional bool[capacity]: coordinates whose moments restart
      from zero in this step.
    salt: see :func:`per_unit`.

  Returns:
    ``(mu, nu)``.
  """
  wide = _wide(mu.dtype)
  new_mu, new_nu = _moments(packed.astype(wide), mu.astype(wide),
                            nu.astype(wide), settings, restart)
  position = lambda: lax.iota(jnp.int32, mu.shape[0])
  return (_store(new_mu, mu, apply, position, salt, 0),
          _store(new_nu, nu, apply, position, salt, 1))


def adam_direction(mu: jax.Array, nu: jax.Array, unit: Unit,
                   settings: AdamSettings) -> jax.Array:
  """The bias-corrected Adam direction of a unit from its updated moments,
  written as ``optax.scale_by_adam`` computes it."""
  wide = _wide(mu.dtype)
  mu_hat = mu.astype(wide) * unit.scale1.astype(wide)
  nu_hat = nu.astype(wide) * unit.scale2.astype(wide)
  if settings.use_eps_root:
    nu_hat = nu_hat + settings.eps_root
  return mu_hat / (jnp.sqrt(nu_hat) + settings.eps)


# finish(unit, update) -> update: a policy's last touch of an active unit's
# update (e.g. BlockLLM's top-k), before inactive units are zeroed.
Finish = Callable[[Unit, jax.Array], jax.Array]


@traced_once(num_static=5)
def _unit_update(shape, size, out_dtype, settings: AdamSettings,
                 finish: Optional[Finish], mu, nu, unit: Unit, param):
  direction = adam_direction(_compact.read_leaf(mu, unit.offset, size),
                             _compact.read_leaf(nu, unit.offset, size), unit,
                             settings)
  update = direction.reshape(shape).astype(out_dtype)
  if settings.use_weight_decay:
    update = update + settings.weight_decay * param.astype(out_dtype)
  if finish is not None:
    update = finish(unit, update)
  elif not settings.use_weight_decay and settings.positive_denominator:
    # Zero where inactive already (``per_unit``'s ``scale1`` times a finite
    # quotient): one select and broadcast fewer per unit (2% of the lean
    # step's instructions).
    return update
  return _where(unit.active, update, jnp.zeros(shape, out_dtype))


def _stacked_update(mu, nu, group: _layout.UnitGroup, units: Units, shape,
                    size, out_dtype, settings: AdamSettings, param):
  """A stacked leaf's update in one elementwise expression: each layer's
  moments are gathered from its window by position, which XLA fuses into
  the update's consumers (e.g. ``optax.apply_updates``) instead of
  materialising the stacked update as a loop would."""
  v = units.vectors
  sl = slice(group.start, group.stop)
  position = (v.offset[sl][:, None]
              + jnp.arange(size, dtype=jnp.int32)[None, :])
  unit = Unit(offset=None, active=v.active[sl][:, None],
              scale1=v.scale1[sl][:, None], scale2=v.scale2[sl][:, None])
  direction = adam_direction(
      mu.at[position].get(mode="clip"), nu.at[position].get(mode="clip"),
      unit, settings)
  update = jnp.moveaxis(direction.reshape((-1,) + shape), 0, group.axis)
  update = update.astype(out_dtype)
  if settings.use_weight_decay:
    update = update + settings.weight_decay * param.astype(out_dtype)
  active = unit.active.reshape([-1] + [1] * len(shape))
  active = jnp.moveaxis(active, 0, group.axis)
  return jnp.where(active, update, jnp.zeros((), out_dtype))


def unit_updates(mu: jax.Array, nu: jax.Array, layout: _layout.LeafLayout,
                 units: Units, settings: AdamSettings,
                 params: Optional[Sequence[Any]] = None,
                 finish: Optional[Finish] = None) -> list:
  """Each unit's update: its Adam direction if active, else exactly zero.

  Args:
    mu, nu: the updated moment buffers.
    layout: the units' static shapes, sizes, dtypes and groups.
    units: the step's per-unit values.
    settings: the Adam hyperparameters (weight decay is added here).
    params: one parameter per group (needed with weight decay).
    finish: optional ``(unit, update) -> update`` of the policy, applied
      after weight decay and before inactive units are zeroed.

  Returns:
    One update per group of ``layout`` (a stacked group's is the whole
    stacked leaf: one expression over its gathered windows, or with
    ``finish`` or missing layers a ``lax.fori_loop`` over its layers), each
    in :func:`update_dtype` of its unit.
  """
  updates = []
  for g, group in enumerate(layout.groups()):
    i = group.start
    shape, size = layout.shapes[i], layout.sizes[i]
    out_dtype = update_dtype(layout.dtypes[i])
    param = params[g] if settings.use_weight_decay else None
    if group.axis is None:
      updates.append(_unit_update(shape, size, out_dtype, settings, finish,
                                  mu, nu, units.at(i), param))
      continue
    axis = group.axis
    stacked_shape = shape[:axis] + (layout.num_layers(group),) + shape[axis:]
    if finish is None and layout.whole_stack(group):
      updates.append(_stacked_update(mu, nu, group, units, shape, size,
                                     out_dtype, settings, param))
      continue

    def body(k, unit, layer, stacked, axis=axis, param=param, shape=shape,
             size=size, out_dtype=out_dtype):
      del k
      layer_param = (None if param is None else
                     lax.dynamic_index_in_dim(param, layer, axis, False))
      update = _unit_update(shape, size, out_dtype, settings, finish, mu, nu,
                            units.at(unit), layer_param)
      return lax.dynamic_update_index_in_dim(stacked, update, layer, axis)

    updates.append(_layer_loop(group, body,
                               jnp.zeros(stacked_shape, out_dtype)))
  return updates


def with_learning_rate(scale_by: optax.GradientTransformationExtraArgs,
                       learning_rate, stochastic_rounding: bool, seed: int):
  """``scale_by`` then the learning rate, then (optionally) stochastic
  rounding: the chain every public alias (``blockllm``, ``badam``,
  ``bread``) returns."""
  _validation.check_learning_rate(learning_rate)
  parts = [scale_by, optax.scale_by_learning_rate(learning_rate)]
  if stochastic_rounding:
    parts.append(_rounding.stochastic_rounding(seed))
  return optax.chain(*parts)


def missing_loss_error(name: str) -> ValueError:
  return ValueError(
      f"{name} decides reselection from the loss: call "
      "`tx.update(grads, state, params, value=loss)` (e.g. "
      "`loss, grads = jax.value_and_grad(loss_fn)(params)`). Without it "
      "the selection would never change.")
