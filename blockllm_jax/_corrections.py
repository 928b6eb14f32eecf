"""BREAD's landscape corrections of the blocks BAdam leaves inactive.

BREAD is BAdam's block schedule (:mod:`blockllm_jax._badam`) plus, in the
same step, a correction of the inactive blocks in scope (all of them, or
with ``scope="partial"`` those between the active block and the output):

- ``"sgd"`` / ``"sign_sgd"``: the block's update is ``correction_scale * g``
  (or ``* sign(g)``) from the gradient the backward pass computed anyway;
  no state.
- ``"lora"``: the block's LoRA adapters (``lora_a`` / ``lora_b``) are
  trained with Adam alongside the active block, scaled by
  ``correction_scale``; their moments belong to the block period of the
  packed buffers and restart at every switch.

This module holds what a correction adds to the schedule's static plan and
to the engine's updates; the state is BAdam's.

References:
  "Accelerating Block Coordinate Descent for LLM Finetuning via Landscape
  Correction" (BREAD), 2024. https://openreview.net/forum?id=zs6bRl05g8
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from blockllm_jax import _blocks
from blockllm_jax import _engine
from blockllm_jax import _validation

CORRECTIONS = ("sgd", "sign_sgd", "lora")
SCOPES = ("all", "partial")


class Correction(NamedTuple):
  """A validated correction (Python values); ``kind=None`` is plain BAdam."""

  kind: Optional[str] = None
  scale: Any = 1.0
  scope: str = "all"

  @property
  def uses_adapters(self) -> bool:
    return self.kind == "lora"

  @property
  def uses_sgd(self) -> bool:
    return self.kind in ("sgd", "sign_sgd")

  @property
  def scales_adapters(self) -> bool:
    return self.uses_adapters and not (
        isinstance(self.scale, (int, float)) and self.scale == 1)


def correction(kind: Optional[str], scale, scope: str) -> Correction:
  """Checks BREAD's arguments; ``kind=None`` for BAdam (the rest ignored)."""
  if kind is None:
    return Correction()
  _validation.check_choice("correction", kind, CORRECTIONS)
  _validation.check_choice("scope", scope, SCOPES)
  _validation.check_nonnegative("correction_scale", scale)
  return Correction(kind, scale, scope)


def adapter_rule(fix: Correction):
  """The partition's adapter predicate (None without LoRA adapters)."""
  if not fix.uses_adapters:
    return None
  # Imported here: the optimizers do not otherwise need the models package.
  from blockllm_jax.models._lora import is_lora_path
  return is_lora_path


def require_adapters(partition: _blocks.BlockPartition,
                     fix: Correction) -> None:
  if (fix.uses_adapters and partition.layout.paths
      and _blocks.ADAPTER not in partition.role):
    raise ValueError(
        "`correction='lora'` trains LoRA adapters, but the parameter tree "
        "has none (no leaf named `lora_a` / `lora_b`); add them with "
        "`blockllm_jax.models.add_lora` or use `correction='sgd'`.")


def block_tables(role: np.ndarray, position: np.ndarray, active: int,
                 fix: Correction):
  """What the correction adds under active block ``active`` (static).

  Returns:
    ``(adam, corrected)``: bool[L] leaves trained with Adam in the block
    period besides the block (LoRA adapters in scope), and leaves given an
    SGD correction.
  """
  reached = _blocks.in_scope(position, active, fix.scope)
  adam = np.zeros(role.shape, bool)
  corrected = np.zeros(role.shape, bool)
  if fix.uses_adapters:
    adam = (role == _blocks.ADAPTER) & reached
  if fix.uses_sgd:
    corrected = (role == _blocks.BLOCK) & reached
  return adam, corrected


def dense_needed(role: Sequence[int], fix: Correction) -> list:
  """Per leaf: whether the step needs its whole gradient (SGD-corrected
  blocks), not only its packed window."""
  return [fix.uses_sgd and r == _blocks.BLOCK for r in role]


def gradients_finite(grads: Sequence[Any], layout, role: Sequence[int],
                     fix: Correction) -> jax.Array:
  """bool[]: every gradient an SGD correction may use is finite.

  ``grads`` has one entry per group of ``layout`` (a stacked leaf whole)."""
  blocks = [grad for grad, group in zip(grads, layout.groups())
            if role[group.start] == _blocks.BLOCK]
  if not (fix.uses_sgd and blocks):
    return jnp.ones([], bool)
  return jnp.all(_engine.finite_flags(blocks))


def correct(updates: list, grads: Sequence[Any], layout, role: Sequence[int],
            units, fix: Correction) -> list:
  """The engine's Adam updates with the correction applied.

  Adapters' Adam updates are scaled by ``correction_scale``; a corrected
  block unit (``flag``, inactive in Adam, False on skipped steps) gets
  ``correction_scale * g`` (or ``* sign(g)``) in the updates' dtype.
  ``updates`` and ``grads`` have one entry per group of ``layout``; a
  stacked group is corrected layer by layer with its units' flags laid
  along its layer axis.
  """
  out = []
  for update, grad, group in zip(updates, grads, layout.groups(),
                                 strict=True):
    r = role[group.start]
    if fix.scales_adapters and r == _blocks.ADAPTER:
      update = fix.scale * update
    if fix.uses_sgd and r == _blocks.BLOCK:
      step = grad.astype(update.dtype)
      if fix.kind == "sign_sgd":
        step = jnp.sign(step)
      if group.axis is None:
        flag = units.at(group.start).flag
      else:
        layers = np.asarray(group.layers)
        flag = jnp.zeros([layout.num_layers(group)], bool).at[layers].set(
            units.vectors.flag[group.start:group.stop])
        shape = [1] * update.ndim
        shape[group.axis] = -1
        flag = flag.reshape(shape)
      update = jnp.where(flag, fix.scale * step, update)
    out.append(update)
  return out
