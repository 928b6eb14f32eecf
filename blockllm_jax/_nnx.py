"""Flax NNX: lean steps through ``nnx.Optimizer``, compute-lean ``nnx.Linear``.

``lean_value_and_grad(loss_fn)(model, optimizer, *args)`` with an NNX model
splits the model into its ``optimizer.wrt`` parameters and the rest, runs
the functional lean path on the parameters (``loss_fn`` sees the model
merged back from them), and returns gradients shaped like what
``nnx.grad`` returns: an ``nnx.State`` of the parameters. Its leaves are
stand-ins (:class:`LeanStandIn`) that all point to the one deferred
:class:`~blockllm_jax.LeanGradients`; ``optimizer.update(model, grads,
value=loss)`` hands them, unchanged, to the ``tx.update`` of our
optimizer, which recognises them (:func:`resolve`) and runs the backward
pass itself. Any other transformation fails on them loudly.

Compute-lean takes over ``nnx.Linear`` as it does linen's ``nn.Dense``:
while the loss is traced, ``nnx.Linear.__call__`` routes a call whose kernel
is one of the parameter leaves through the lean product.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import jax


class LeanStandIn:
  """A gradient leaf that stands for the deferred lean gradient.

  Not an array and not a pytree: only our optimizers accept it (see
  :func:`resolve`); anything that computes on it fails.
  """

  __slots__ = ("lean",)

  def __init__(self, lean):
    self.lean = lean

  def __repr__(self) -> str:
    return "LeanStandIn(<deferred lean gradient>)"


def resolve(updates: Any) -> Any:
  """The :class:`~blockllm_jax.LeanGradients` behind a tree of stand-ins
  (what ``nnx.Optimizer.update`` passes on), or ``updates`` unchanged."""
  leaves = jax.tree_util.tree_leaves(updates)
  if not leaves or not isinstance(leaves[0], LeanStandIn):
    return updates
  lean = leaves[0].lean
  if any(not isinstance(x, LeanStandIn) or x.lean is not lean for x in leaves):
    raise ValueError(
        "updates mix lean-gradient stand-ins with other leaves; pass what "
        "lean_value_and_grad returned, unchanged, to optimizer.update.")
  if jax.tree_util.tree_structure(updates) != lean.treedef:
    raise ValueError(
        "the lean gradients were computed for other parameters than these "
        "updates: use the same `wrt` filter in nnx.Optimizer and pass the "
        "same model to lean_value_and_grad and optimizer.update.")
  return lean


def is_module(value) -> bool:
  from flax import nnx  # imported on first use: plain Optax users never pay for it
  return isinstance(value, nnx.Module)


def is_optimizer(value) -> bool:
  from flax import nnx
  return isinstance(value, nnx.Optimizer)


def lean_call(functional: Callable, loss_fn: Callable, model, optimizer,
              args, kwargs):
  """``functional(pure_loss)(params, opt_state, *args, **kwargs)`` for an
  NNX model; returns its loss output and an ``nnx.State`` of stand-ins.

  ``functional(pure_loss)`` runs ``pure_loss``, which returns ``(the
  user's output, the model's non-parameter state after the call)``; that
  state is written back to ``model``, as ``nnx.value_and_grad`` would.
  """
  from flax import nnx
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
        "lean_value_and_grad(loss_fn)(model, optimizer, ...): with an nnx "
        f"Module as `model`, `optimizer` must be an nnx.Optimizer; got "
        f"{type(optimizer).__name__}.")
  graphdef, param_state, rest = nnx.split(model, optimizer.wrt, ...)
  params = nnx.as_pure(param_state)
  # Arrays, not the model's Variables: the loss runs in the backward
  # pass's traces, where the model's own Variables must not be mutated.
  rest = nnx.as_pure(rest)
  opt_state = nnx.as_pure(optimizer.opt_state)
  from blockllm_jax import _introspect
  try:
    _introspect.find_state(opt_state)
  except ValueError:
    raise ValueError(
        "`optimizer` (an nnx.Optimizer) must hold one blockllm, badam or bread "
        f"transformation in its tx; its state holds none (or several): "
        f"{type(optimizer.tx).__name__}.") from None

  def pure_loss(tree, *inner_args, **inner_kwargs):
    merged = nnx.merge(graphdef, tree, rest)
    out = loss_fn(merged, *inner_args, **inner_kwargs)
    # What the call changed besides the parameters (RNG counters of
    # dropout, batch statistics, ...) goes back to the user's model.
    return out, nnx.as_pure(nnx.state(merged, nnx.Not(optimizer.wrt)))

  (out, new_rest), lean = functional(pure_loss)(params, opt_state, *args, **kwargs)
  nnx.update(model, new_rest)
  stand_in = LeanStandIn(lean)
  grads = jax.tree.map(lambda v: v.replace(stand_in), param_state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return out, grads


def _is_plain_linear(module) -> bool:
  """An ``nnx.Linear`` whose product we reproduce exactly."""
  from flax.nnx.nn import dtypes
  return (module.dot_general is jax.lax.dot_general
          and module.promote_dtype is dtypes.promote_dtype
          and module.preferred_element_type is None)


@contextlib.contextmanager
def linear_hook(interceptor):
  """Routes ``nnx.Linear`` calls to ``interceptor.take`` while active, and
  records ``nnx.LinearGeneral`` / ``nnx.Einsum`` calls as not taken over."""
  from flax import nnx
  original = nnx.Linear.__call__
  others = {cls: cls.__call__ for cls in (nnx.LinearGeneral, nnx.Einsum)}

  def linear_call(module, inputs, *args, **kwargs):
    kernel = module.kernel.get_value()
    if (args or any(v is not None for v in kwargs.values())
        or not _is_plain_linear(module)):
      interceptor.passed_over[f"nnx.Linear{tuple(kernel.shape)}"] = (
          "a custom dot_general / promote_dtype / preferred_element_type or "
          "call arguments")
      return original(module, inputs, *args, **kwargs)
    bias = module.bias.get_value() if module.bias is not None else None
    outputs = interceptor.take(
        module, inputs, kernel, bias, module.dtype,
        lambda: f"nnx.Linear{tuple(kernel.shape)}")
    if outputs is None:
      return original(module, inputs, *args, **kwargs)
    return outputs

  def passed_over(cls):
    def call(module, *args, **kwargs):
      kernel = module.kernel.get_value()
      interceptor.passed_over[f"nnx.{cls.__name__}{tuple(kernel.shape)}"] = (
          f"nnx.{cls.__name__} is not taken over")
      return others[cls](module, *args, **kwargs)
    return call

  nnx.Linear.__call__ = linear_call
  for cls in others:
    cls.__call__ = passed_over(cls)
  try:
    yield
  finally:
    nnx.Linear.__call__ = original
    for cls, call in others.items():
      cls.__call__ = call
