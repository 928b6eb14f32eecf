"""Compute-lean ``Dense`` layers inside ``jax.checkpoint`` (``nn.remat``).

The Dense interceptor of :mod:`blockllm_jax._lean` takes over calls made at
the trace level of the loss function. A rematerialised layer runs in a
trace of its own, and its outputs are the layer's: the control tokens and
the chain that a taken-over ``Dense`` threads (see ``_lean._lean_dense``)
have no way out of it. So the loss is traced to a jaxpr once more and
evaluated equation by equation, with each ``checkpoint`` (``remat2``)
equation whose body holds such a layer *rebuilt*: the same body under
``jax.checkpoint`` with the same policy, plus the chain as an input and an
output and one control token per taken-over layer as outputs, and the
layer's product done by the lean Dense. The rematerialised backward pass
then recomputes the layer's forward as before, and computes its weight
gradient only when the optimizer asks for it, writing it into the chain.

What is a ``Dense`` here is a pattern, not a module: a parameter leaf that
enters one ``checkpoint`` equation and there feeds one ``dot_general`` as its
right operand (possibly through one dtype cast), contracting the last axis
of the activations with the kernel's first, as ``nn.Dense`` and
``nnx.Linear`` do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.extend.core as jex_core

_REMAT = "remat2"
_CHAIN = 3  # leaves of the chain (see `_lean._Sinks`): last outputs of a
# chained tap or lean Dense.

# dense(slot, inputs, kernel, precision, chain) -> (outputs, token, chain)
DenseFn = Callable[[int, Any, Any, Any, Any], tuple]


def _uses(jaxpr) -> dict:
  """var -> list of ``(equation index, operand position)``; the jaxpr's
  outputs count as uses at index ``len(eqns)``."""
  uses: dict = {}
  for index, eqn in enumerate(jaxpr.eqns):
    for position, var in enumerate(eqn.invars):
      if not isinstance(var, jex_core.Literal):
        uses.setdefault(var, []).append((index, position))
  for position, var in enumerate(jaxpr.outvars):
    if not isinstance(var, jex_core.Literal):
      uses.setdefault(var, []).append((len(jaxpr.eqns), position))
  return uses


def _is_dense_product(eqn) -> bool:
  """``dot_general(x, kernel)`` contracting x's last axis with a 2-D
  kernel's first, no batch axes, no change of result type."""
  if eqn.primitive.name != "dot_general":
    return False
  lhs, rhs = (v.aval for v in eqn.invars)
  ((lhs_contract, rhs_contract), batch) = eqn.params["dimension_numbers"]
  preferred = eqn.params.get("preferred_element_type")
  out_dtype = eqn.outvars[0].aval.dtype
  return (rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
          and tuple(rhs_contract) == (0,) and not any(map(len, batch))
          and (preferred is None or preferred == out_dtype)
          and eqn.params.get("out_sharding") is None)


def _dense_kernel_var(jaxpr, var, uses) -> Optional[Any]:
  """The variable a Dense product reads as its kernel if ``var``'s only use
  is one (directly or through one dtype cast); else None."""
  for _ in range(2):
    found = uses.get(var, [])
    if len(found) != 1 or found[0][0] == len(jaxpr.eqns):
      return None
    index, position = found[0]
    eqn = jaxpr.eqns[index]
    if eqn.primitive.name == "convert_element_type":
      var = eqn.outvars[0]
      continue
    if position == 1 and _is_dense_product(eqn):
      return var
    return None
  return None


def _kernel_inputs(eqn, slot_of_var: dict) -> dict:
  """Of a ``checkpoint`` equation: body input -> slot, for the inputs of
  ``slot_of_var`` (outer variable -> slot) that are a Dense layer's
  kernel in the body."""
  if eqn.primitive.name != _REMAT:
    return {}
  body = eqn.params["jaxpr"]
  uses = _uses(body)
  return {body.invars[i]: slot_of_var[var]
          for i, var in enumerate(eqn.invars)
          if var in slot_of_var
          and _dense_kernel_var(body, body.invars[i], uses) is not None}


def _live_uses(jaxpr, var, uses) -> list:
  """``var``'s uses, less the checkpoint inputs its body never reads
  (Flax's lifted transforms pass a scope's every variable in)."""
  live = []
  for index, position in uses.get(var, []):
    if index < len(jaxpr.eqns) and jaxpr.eqns[index].primitive.name == _REMAT:
      body = jaxpr.eqns[index].params["jaxpr"]
      if body.invars[position] not in _uses(body):
        continue
    live.append((index, position))
  return live


def remat_dense_slots(jaxpr, slot_of_var: dict) -> frozenset:
  """Slots (of ``slot_of_var``: top-level input variable -> slot) whose
  leaf is only read by one ``checkpoint`` equation, where it is a Dense
  layer's kernel (see the module doc)."""
  uses = _uses(jaxpr)
  taken = set()
  for var, slot in slot_of_var.items():
    live = _live_uses(jaxpr, var, uses)
    if (len(live) == 1 and live[0][0] < len(jaxpr.eqns) and
        _kernel_inputs(jaxpr.eqns[live[0][0]], {var: slot})):
      taken.add(slot)
  return frozenset(taken)


def _bind(eqn, values):
  params = eqn.primitive.get_bind_params(eqn.params)
  out = eqn.primitive.bind(*values, **params)
  return out if eqn.primitive.multiple_results else [out]


def _read(env, var):
  return var.val if isinstance(var, jex_core.Literal) else env[var]


def _run_body(jaxpr, values, slot_of_var: dict, dense: DenseFn, chain,
              tokens: dict):
  """Evaluates a checkpoint body with its Dense layers of ``slot_of_var``
  (body input -> slot) done by ``dense``; returns (outputs, chain)."""
  env = dict(zip(jaxpr.invars, values))
  uses = _uses(jaxpr)
  kernel_slot = {_dense_kernel_var(jaxpr, var, uses): slot
                 for var, slot in slot_of_var.items()}
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    slot = (kernel_slot.get(eqn.invars[1])
            if eqn.primitive.name == "dot_general" else None)
    if slot is not None:
      out, tokens[slot], chain = dense(slot, ins[0], ins[1],
                                       eqn.params["precision"], chain)
      outs = [out]
    else:
      outs = _bind(eqn, ins)
    env.update(zip(eqn.outvars, outs))
  return [_read(env, v) for v in jaxpr.outvars], chain


def run(closed, args, chain_vars: list, remat_slot_of_var: dict,
        dense: DenseFn) -> tuple:
  """Evaluates ``closed`` (the traced lean forward pass) on ``args``,
  rebuilding each ``checkpoint`` equation that holds a Dense layer of
  ``remat_slot_of_var`` (top-level input -> slot).

  ``chain_vars`` are the input variables of the chain: the chain is
  threaded in equation order through the chained taps and lean Dense
  calls already in the jaxpr (which return it as their last outputs) and
  through the rebuilt equations.

  Returns ``(outputs, tokens)``: the jaxpr's outputs and, per slot taken
  over here, its control token.
  """
  jaxpr = closed.jaxpr
  env = dict(zip(jaxpr.constvars, closed.consts))
  env.update(zip(jaxpr.invars, args))
  chain_vars = list(chain_vars)
  tokens: dict = {}
  for eqn in jaxpr.eqns:
    ins = [_read(env, v) for v in eqn.invars]
    inner_slots = _kernel_inputs(eqn, remat_slot_of_var)
    if inner_slots:
      body = eqn.params["jaxpr"]
      order = sorted(set(inner_slots.values()))

      def rebuilt(chain, *values, body=body, inner_slots=inner_slots,
                  order=order):
        found: dict = {}
        outs, chain = _run_body(body, values, inner_slots, dense, chain,
                                found)
        return outs, tuple(found[s] for s in order), chain

      chain = tuple(_read(env, v) for v in chain_vars)
      outs, found, chain = jax.checkpoint(
          rebuilt, prevent_cse=eqn.params["prevent_cse"],
          policy=eqn.params["policy"])(chain, *ins)
      tokens.update(zip(order, found))
      # The next chained call reads the chain's current variables.
      env.update(zip(chain_vars, chain))
    else:
      outs = _bind(eqn, ins)
      if any(v in chain_vars for v in eqn.invars
             if not isinstance(v, jex_core.Literal)):
        chain_vars = list(eqn.outvars[-_CHAIN:])
    env.update(zip(eqn.outvars, outs))
  return [_read(env, v) for v in jaxpr.outvars], tokens

