"""The packed-moment Adam engine shared by BlockLLM, BAdam and BREAD.

The three optimizers differ only in *which* parameter units (leaves) are
trained in a step; a selection policy (:mod:`blockllm_jax._blockllm`,
:mod:`blockllm_jax._badam`) decides that, and this engine does the rest:

1. the moments: :func:`update_unit_moments` updates each active unit's
   windows of the two flat moment buffers in place, straight from its
   gradient (no packed copy of the gradients exists); with the lean taps
   of :mod:`blockllm_jax._lean`, which hand over the gradients already
   packed, :func:`update_moments` updates the whole buffer at once;
2. :func:`unit_updates`: each unit's bias-corrected direction is read back
   from its window of the moments (zero for inactive units), then finished
   by the policy (weight decay, top-k, a correction).

There is no ``lax.cond`` per unit. What the program costs to compile is set
by the number of *distinct* kernels, and XLA reuses one compiled kernel for
all fusions that are identical, e.g. the same projection in every layer.
A unit's scalars (offset, active flag, bias corrections) read as slices of
a vector would make each unit's kernel unique (the slice position is a
constant inside it); :func:`per_unit` therefore splits those vectors into
separate scalar buffers with one variadic reduction, so the per-unit
kernels of same-shaped units are the same kernel and the step compiles in
time close to AdamW's.

References:
  Kingma and Ba, "Adam: A Method for Stochastic Optimization", 2015.
  https://arxiv.org/abs/1412.6980
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
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
    return not (isinstance(self.weight_decay, (int, float))
                and self.weight_decay == 0)


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


class Unit(NamedTuple):
  """One unit's scalars as separate arrays (see :func:`per_unit`)."""

  offset: jax.Array  # int32[] start of the unit's window in the buffers.
  active: jax.Array  # bool[] trained with Adam in this step.
  bias1: jax.Array  # float32[] 1 - b1**count.
  bias2: jax.Array  # float32[] 1 - b2**count.
  flag: Optional[jax.Array] = None  # bool[] a policy's extra per-unit flag.
  restart: Optional[jax.Array] = None  # bool[] moments restart this step.


def split_rows(vectors: Sequence[jax.Array]) -> list:
  """``[[v[i] for v in vectors] for i in range(n)]`` as separate buffers.

  The vectors (int32 or float32, bit-cast to int32) become the columns of
  an ``[n, k]`` matrix, and one variadic reduction over ``n`` masked copies
  of it yields row ``i`` as output ``i``: a single kernel whose outputs are
  separate arrays (each the sum of one row and zeros, hence exact),
  instead of ``n`` slices that XLA would fuse into, and so make distinct,
  every consumer's kernel.
  """
  n = int(vectors[0].shape[0])
  if n == 0:
    return []
  as_int = [v if v.dtype == jnp.int32 else
            lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)
            for v in vectors]
  matrix = jnp.stack(as_int, axis=1)  # int32[n, k]
  iota = jnp.arange(n)[:, None]
  operands = tuple(jnp.where(iota == i, matrix, 0) for i in range(n))
  zeros = tuple(jnp.zeros([], jnp.int32) for _ in range(n))

  def add(xs, ys):
    return tuple(x + y for x, y in zip(xs, ys))

  rows = lax.reduce(operands, zeros, add, (0,))
  return [[row[k] if v.dtype == jnp.int32 else
           lax.bitcast_convert_type(row[k], jnp.float32)
           for k, v in enumerate(vectors)] for row in rows]


def per_unit(offset: jax.Array, active: jax.Array, count: jax.Array,
             settings: AdamSettings, flag: Optional[jax.Array] = None,
             restart: Optional[jax.Array] = None) -> list:
  """The per-unit scalars of one step, as a list of :class:`Unit`.

  Args:
    offset: int32[L] start of each unit's window in the moment buffers.
    active: bool[L] units trained with Adam in this step (False for every
      unit of a skipped step). A step-wide flag such as finiteness belongs
      in here, not in a scalar next to the units: XLA would fuse its
      computation into, and so repeat it in, every unit's kernel.
    count: int32[L] Adam steps of each unit including this one (>= 1 where
      active); bias corrections are computed for all units at once.
    settings: the Adam hyperparameters.
    flag: optional bool[L] the policy reads per unit (e.g. BREAD's SGD
      correction).
    restart: optional bool[L]: units whose moments restart from zero.
  """
  count = jnp.maximum(count, 1)  # inactive units: a harmless correction
  bias1 = (1 - settings.b1**count).astype(jnp.float32)
  bias2 = (1 - settings.b2**count).astype(jnp.float32)
  ints = [offset.astype(jnp.int32), active.astype(jnp.int32)]
  optional = [v for v in (flag, restart) if v is not None]
  ints += [v.astype(jnp.int32) for v in optional]
  units = []
  for row in split_rows([bias1, bias2] + ints):
    extra = iter(row[4:])
    units.append(Unit(
        offset=row[2], active=row[3] > 0, bias1=row[0], bias2=row[1],
        flag=next(extra) > 0 if flag is not None else None,
        restart=next(extra) > 0 if restart is not None else None))
  return units


def _moments(grad, mu, nu, settings: AdamSettings, restart=None):
  """Adam's moment update, elementwise; ``restart`` zeroes the old moments."""
  if restart is not None:
    mu = jnp.where(restart, 0, mu)
    nu = jnp.where(restart, 0, nu)
  return ((1 - settings.b1) * grad + settings.b1 * mu,
          (1 - settings.b2) * (grad**2) + settings.b2 * nu)


def update_unit_moments(mu: jax.Array, nu: jax.Array,
                        grads: Sequence[jax.Array], units: Sequence[Unit],
                        settings: AdamSettings):
  """Adam's moment update straight from each unit's gradient, in place.

  Each active unit's windows of ``mu`` / ``nu`` are read, updated with its
  gradient and written back; an inactive unit (or a skipped step) writes
  back what it read, so no shape depends on the data. No packed copy of
  the gradients is ever made.

  Args:
    mu, nu: the moment buffers.
    grads: each unit's gradient.
    units: each unit's scalars (:func:`per_unit`; ``restart`` honoured).
    settings: the Adam hyperparameters.

  Returns:
    ``(mu, nu)``.
  """
  for grad, unit in zip(grads, units, strict=True):
    flat = grad.reshape(-1).astype(mu.dtype)
    size = flat.shape[0]
    old_mu = _compact.read_leaf(mu, unit.offset, size)
    old_nu = _compact.read_leaf(nu, unit.offset, size)
    new_mu, new_nu = _moments(flat, old_mu, old_nu, settings, unit.restart)
    mu = lax.dynamic_update_slice(
        mu, jnp.where(unit.active, new_mu, old_mu).astype(mu.dtype),
        (unit.offset,))
    nu = lax.dynamic_update_slice(
        nu, jnp.where(unit.active, new_nu, old_nu).astype(nu.dtype),
        (unit.offset,))
  return mu, nu


def finite_flags(grads: Sequence[jax.Array]) -> jax.Array:
  """bool[L]: each gradient is finite.

  Written as ``isfinite(max |g|)`` (XLA's max propagates NaN): one
  reduction to a scalar per leaf, where ``all(isfinite(g))`` lowers to a
  predicate reduction that XLA:CPU splits into several kernels and
  temporaries (about half the program and compile time for this check).
  """
  if not grads:
    return jnp.zeros([0], bool)
  return jnp.isfinite(jnp.stack(
      [jnp.max(jnp.abs(grad)).astype(jnp.float32) for grad in grads]))


def update_moments(mu: jax.Array, nu: jax.Array, packed: jax.Array,
                   apply: jax.Array, settings: AdamSettings,
                   restart: Optional[jax.Array] = None):
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

  Returns:
    ``(mu, nu)``.
  """
  new_mu, new_nu = _moments(packed, mu, nu, settings, restart)
  return (jnp.where(apply, new_mu, mu).astype(mu.dtype),
          jnp.where(apply, new_nu, nu).astype(nu.dtype))


def adam_direction(mu: jax.Array, nu: jax.Array, unit: Unit,
                   settings: AdamSettings) -> jax.Array:
  """The bias-corrected Adam direction of a unit from its updated moments,
  written as ``optax.scale_by_adam`` computes it."""
  mu_hat = mu / unit.bias1.astype(mu.dtype)
  nu_hat = nu / unit.bias2.astype(nu.dtype)
  return mu_hat / (jnp.sqrt(nu_hat + settings.eps_root) + settings.eps)


# finish(i, unit, update) -> update: a policy's last touch of an active
# unit's update (e.g. BlockLLM's top-k), before inactive units are zeroed.
Finish = Callable[[int, Unit, jax.Array], jax.Array]


def unit_updates(mu: jax.Array, nu: jax.Array, layout: _layout.LeafLayout,
                 units: Sequence[Unit], settings: AdamSettings,
                 params: Optional[Sequence[Any]] = None,
                 finish: Optional[Finish] = None) -> list:
  """Each unit's update: its Adam direction if active, else exactly zero.

  Args:
    mu, nu: the updated moment buffers.
    layout: the units' static shapes, sizes and dtypes.
    units: the step's per-unit scalars.
    settings: the Adam hyperparameters (weight decay is added here).
    params: each unit's parameter (needed with weight decay).
    finish: optional ``(i, unit, update) -> update`` of the policy, applied
      after weight decay and before inactive units are zeroed.

  Returns:
    A list of updates, each in :func:`update_dtype` of its unit.
  """
  updates = []
  for i, unit in enumerate(units):
    shape, size = layout.shapes[i], layout.sizes[i]
    out_dtype = update_dtype(layout.dtypes[i])
    direction = adam_direction(_compact.read_leaf(mu, unit.offset, size),
                               _compact.read_leaf(nu, unit.offset, size), unit,
                               settings)
    update = direction.reshape(shape).astype(out_dtype)
    if settings.use_weight_decay:
      update = update + settings.weight_decay * params[i].astype(out_dtype)
    if finish is not None:
      update = finish(i, unit, update)
    updates.append(jnp.where(unit.active, update, jnp.zeros(shape, out_dtype)))
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
