"""Stochastic rounding of low-precision parameter updates.

A bf16 parameter of magnitude ~0.02 has a spacing (ulp) of about 1.2e-4, so an
update ``lr * g`` smaller than half of that rounds back to the old value: with
round-to-nearest, small SGD corrections and small-learning-rate Adam steps on
bf16 weights do nothing at all. Stochastic rounding rounds ``p + u`` up with
probability equal to its distance from the lower neighbour, so the *expected*
new parameter is exactly ``p + u`` and small updates accumulate over steps.
It costs no memory beyond one PRNG key (an fp32 master copy would cost four
bytes per corrected coordinate).

References:
  Gupta et al., "Deep Learning with Limited Numerical Precision", 2015.
  https://arxiv.org/abs/1502.02551
  Zamirai et al., "Revisiting BFloat16 Training", 2020.
  https://arxiv.org/abs/2010.06192
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`."""

  key: jax.Array  # uint32[2] PRNG key, split at every update.


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: an invertible, well-mixing map."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _random_bits(shape, key: jax.Array) -> jax.Array:
  """uint32 pseudo-random bits per coordinate: a hash of the coordinate's
  index and two words drawn from ``key``.

  Elementwise, so XLA fuses it into the rounding and no array of random
  numbers is ever materialised (``jax.random.uniform`` would hold one
  float32 per coordinate). Rounding needs unbiased, decorrelated bits, not
  cryptographic ones.
  """
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  size = int(np.prod(shape, dtype=np.int64))
  index = jax.lax.iota(jnp.uint32, size).reshape(shape)
  return _mix32(_mix32(index * jnp.uint32(0x9E3779B9) + seeds[0]) ^ seeds[1])


def hashed_bits(position: jax.Array, salt: jax.Array, stream: int = 0) -> jax.Array:
  """uint32 pseudo-random bits of coordinate ``position`` at step ``salt``.

  A counter-based generator (no key, no state): the hash of the position,
  the salt (e.g. the step count) and a ``stream`` number that separates
  arrays rounded in the same step (e.g. the two Adam moments).
  """
  salt = jnp.asarray(salt).astype(jnp.uint32)
  mixed = _mix32(salt * jnp.uint32(0x85EBCA77) + jnp.uint32(0x27D4EB2F * (stream + 1)
                                                            & 0xFFFFFFFF))
  return _mix32(_mix32(position.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
                       + mixed) ^ (mixed >> 7))


def stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
  """Rounds float32 ``x`` to the float ``dtype`` stochastically (unbiased).

  ``x`` between neighbours ``lo < hi`` of ``dtype`` becomes ``hi`` with
  probability ``(x - lo) / (hi - lo)`` (to 16 bits for bfloat16, 24 bits
  otherwise) and ``lo`` otherwise, so ``E[result] = x``. Exactly
  representable and non-finite values come back as ``x.astype(dtype)``.

  Args:
    x: float32 array.
    dtype: a float dtype narrower than float32 (e.g. ``jnp.bfloat16``).
    key: PRNG key.

  Returns:
    An array of ``dtype``.
  """
  return round_with_bits(x, dtype, _random_bits(x.shape, key))


def round_with_bits(x: jax.Array, dtype, bits: jax.Array) -> jax.Array:
  """:func:`stochastic_round` with the caller's uint32 random ``bits``
  (one per coordinate, e.g. from :func:`hashed_bits`)."""
  x = x.astype(jnp.float32)
  dtype = jnp.dtype(dtype)
  if dtype == jnp.bfloat16:
    # bfloat16 is float32's top half: add 16 random bits to the discarded
    # low half and truncate. The carry rounds the magnitude up with
    # probability (low half) / 2**16.
    raw = jax.lax.bitcast_convert_type(x, jnp.uint32)
    raw = (raw + (bits & jnp.uint32(0xFFFF))) & jnp.uint32(0xFFFF0000)
    rounded = jax.lax.bitcast_convert_type(raw, jnp.float32).astype(dtype)
    return jnp.where(jnp.isfinite(x), rounded, x.astype(dtype))
  nearest = x.astype(dtype)
  nearest32 = nearest.astype(jnp.float32)
  # The neighbour on the other side of x.
  toward = jnp.where(nearest32 <= x, jnp.inf, -jnp.inf).astype(dtype)
  other32 = jnp.nextafter(nearest, toward).astype(jnp.float32)
  lo = jnp.minimum(nearest32, other32)
  hi = jnp.maximum(nearest32, other32)
  uniform = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
  # Both differences are exact in float32: hi - lo is one ulp of `dtype`
  # and x lies within it.
  rounded = jnp.where(uniform * (hi - lo) < x - lo, hi, lo).astype(dtype)
  exact = (nearest32 == x) | ~jnp.isfinite(x) | ~jnp.isfinite(other32)
  return jnp.where(exact, nearest, rounded)


def _is_narrower_float(param, update) -> bool:
  param_dtype = jnp.dtype(param.dtype)
  update_dtype = jnp.dtype(update.dtype)
  return (jnp.issubdtype(param_dtype, jnp.floating)
          and jnp.issubdtype(update_dtype, jnp.floating)
          and param_dtype.itemsize < update_dtype.itemsize)


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
  """Makes ``apply_updates(params, updates)`` round stochastically.

  Put it last in a chain whose updates for low-precision parameters arrive
  in a wider float dtype (as :func:`blockllm_jax.scale_by_badam` /
  :func:`blockllm_jax.scale_by_bread` produce them). For each such leaf it
  computes ``q = stochastic_round(p + u)`` in the parameter's dtype and
  returns ``q - p`` in that dtype, so that ``optax.apply_updates`` lands
  on ``q``: exactly whenever ``q`` is within a factor of two of ``p`` or
  ``p == 0`` (Sterbenz), which covers every small step; a step larger than
  the parameter itself gets within one ulp of ``q``. Leaves whose update is
  not wider than the parameter pass through unchanged; with no such leaf at
  all (float32 parameters) the transformation is the identity and its key
  does not advance.

  Memory: no per-parameter state, one ``uint32[2]`` key; the random bits
  are a hash of the coordinate index fused into the rounding, so no random
  array is materialised. Compute: a few integer operations per coordinate
  of the rounded leaves per step.

  Args:
    seed: seed of the PRNG key.

  Returns:
    An ``optax.GradientTransformation``; its ``update`` needs ``params``.

  Example:
    >>> tx = optax.chain(optax.sgd(1e-4), blockllm_jax.stochastic_rounding())
    >>> # with float32 gradients of bfloat16 parameters

  References:
    Gupta et al., 2015. https://arxiv.org/abs/1502.02551
  """

  def init_fn(params):
    del params
    return StochasticRoundingState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    flat_updates, treedef = jax.tree_util.tree_flatten(updates)
    if params is None:
      raise ValueError("`stochastic_rounding` needs `params` in `update` to "
                       "round `params + updates`.")
    flat_params = treedef.flatten_up_to(params)
    narrower = [_is_narrower_float(p, u)
                for u, p in zip(flat_updates, flat_params)]
    if not any(narrower):
      # Nothing to round: no key split either (on CPU a split is a loop in
      # the program, one more for XLA to simplify in every step).
      return updates, state
    key, subkey = jax.random.split(state.key)
    out = []
    for i, (update, param) in enumerate(zip(flat_updates, flat_params)):
      if not narrower[i]:
        out.append(update)
        continue
      target = param.astype(jnp.float32) + update.astype(jnp.float32)
      rounded = stochastic_round(target, param.dtype,
                                 jax.random.fold_in(subkey, i))
      out.append((rounded.astype(jnp.float32) -
                  param.astype(jnp.float32)).astype(param.dtype))
    return treedef.unflatten(out), StochasticRoundingState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)
