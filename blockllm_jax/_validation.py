"""Argument checks shared by the transformations.

Hyperparameters may arrive as Python numbers, concrete arrays (e.g. from
``optax.inject_hyperparams``' ``init``) or tracers (its ``update`` under
``jit``). Python numbers and concrete arrays are checked; tracers cannot be
and are passed through.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value: Any):
  """Returns ``value`` as a Python float, or None if it is a tracer."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def check_range(name: str, value: Any, low: float, high: float,
                low_closed: bool = True, high_closed: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` lies in the interval."""
  x = _concrete(value)
  if x is None:
    return
  above = x >= low if low_closed else x > low
  below = x <= high if high_closed else x < high
  if not (above and below and not math.isnan(x)):
    lo = "[" if low_closed else "("
    hi = "]" if high_closed else ")"
    raise ValueError(
        f"`{name}` must be in {lo}{low}, {high}{hi}; got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
  check_range(name, value, 0.0, math.inf)


def check_learning_rate(value: Any) -> None:
  if callable(value):
    return
  check_nonnegative("learning_rate", value)


def check_integer(name: str, value: Any, minimum: int) -> None:
  """Raises ``ValueError`` unless a concrete ``value`` is an int >= minimum."""
  x = _concrete(value)
  if x is not None and (x != int(x) or x < minimum):
    raise ValueError(
        f"`{name}` must be an integer >= {minimum}; got {value!r}.")


def _require_concrete(name: str, value: Any, kind: str) -> None:
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"`{name}` sets the shape of the optimizer state and must be a "
        f"concrete {kind}, not a traced value. With "
        "`optax.inject_hyperparams`, list it in `static_args`.")


def static_int(name: str, value: Any, minimum: int) -> int:
  """Converts a shape-determining argument to ``int``, checking ``minimum``.

  Such arguments set array shapes, so they must be concrete. Under
  ``optax.inject_hyperparams`` name them in ``static_args``.
  """
  _require_concrete(name, value, "integer")
  check_integer(name, value, minimum)
  return int(float(np.asarray(value)))


def static_float(name: str, value: Any) -> float:
  _require_concrete(name, value, "number")
  return float(np.asarray(value))


def scalar_loss(value: Any) -> jax.Array:
  """``value`` (the loss passed to ``update``) as a float32 scalar."""
  loss = jnp.asarray(value, jnp.float32)
  if loss.shape != ():
    raise ValueError(f"`value` must be a scalar loss; got shape {loss.shape}.")
  return loss


def check_choice(name: str, value: Any, choices) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if not isinstance(value, str) or value not in choices:
    raise ValueError(
        f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; "
        f"got {value!r}.")
