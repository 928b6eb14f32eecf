"""Lean steps inside ``jax.checkpoint`` (``nn.remat``) and ``lax.scan``
(``nn.scan``).

The Dense interceptor of :mod:`blockllm_jax._lean` takes over calls made at
the trace level of the loss function. A rematerialised or scanned layer
runs in a trace of its own whose outputs are the layer's: the control
tokens and the chain that a taken-over ``Dense`` threads (see
``_lean._lean_dense``) have no way out of it, and a scan's backward pass
would produce a stacked leaf's gradient whole, every layer at once. So the
loss is traced to a jaxpr once more and evaluated equation by equation,
with the equations that hold our parameters rebuilt:

- a ``checkpoint`` (``remat2``) equation whose body uses a leaf as a Dense
  kernel: the same body under ``jax.checkpoint`` with the same policy, plus
  the chain as an input and an output and one control token per layer
  taken over as outputs; the product is done by the lean Dense, so the
  rematerialised backward pass recomputes the layer and computes its weight
  gradient only when asked;
- a ``scan`` equation that slices stacked leaves (layers on axis 0, as
  ``nn.scan`` passes them): the same body in a ``lax.scan`` that carries
  the chain too, takes each stacked leaf's per-layer norm sinks as inputs
  and returns its per-layer control tokens as outputs. In the body a leaf
  that is a Dense kernel (directly or inside a ``checkpoint``) is taken
  over there; any other (a norm's scale) is tapped per layer. So each
  layer's gradient is reduced, per unit, while the scan's backward pass
  produces it, and a skipped layer computes no weight gradient.

What is a ``Dense`` here is a pattern, not a module: a parameter that feeds
one ``dot_general`` as its right operand (possibly through one dtype cast),
contracting the last axis of the activations with the 2-D kernel's first,
as ``nn.Dense`` and ``nnx.Linear`` do.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.extend.core as jex_core
from jax import lax

_REMAT = "remat2"
_SCAN = "scan"


class Hooks(NamedTuple):
  """What takes a parameter over (see ``_lean._functional``)."""

  # (slot, inputs, kernel, precision, chain, norm sink) -> (outputs, token,
  # chain): a lean Dense; None: Dense layers are not taken over (tier B).
  dense: Optional[Callable]
  # (slot, value, chain, norm sink) -> (value, token, chain): a chained tap.
  tap: Callable


class Plan(NamedTuple):
  """How one slot is taken over in one jaxpr."""

  kind: str  # "dense" | "tap" | "remat" | "scan"
  eqn: int = -1  # the checkpoint / scan equation (remat, scan)
  layers: int = 1  # a scanned leaf's layers (its scan's length)


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


def _body(eqn):
  """(open jaxpr, consts) of a checkpoint or scan equation's body."""
  body = eqn.params["jaxpr"]
  if isinstance(body, jex_core.ClosedJaxpr):
    return body.jaxpr, body.consts
  return body, ()


def _live_uses(jaxpr, var, uses) -> list:
  """``var``'s uses, less the checkpoint / scan inputs their body never
  reads (Flax's lifted transforms pass a scope's every variable in)."""
  live = []
  for index, position in uses.get(var, []):
    if index < len(jaxpr.eqns) and jaxpr.eqns[index].primitive.name in (
        _REMAT, _SCAN):
      body, _ = _body(jaxpr.eqns[index])
      if body.invars[position] not in _uses(body):
        continue
    live.append((index, position))
  return live


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


def _plans(jaxpr, slot_of_var: dict, in_scan: bool, take_dense: bool) -> dict:
  """slot -> :class:`Plan` for the slots of ``slot_of_var`` (variable of
  ``jaxpr`` -> slot) this jaxpr can take over; inside a scan's body every
  slot is (a layer's slice: tapped if nothing better). Without
  ``take_dense`` (gradient-lean tier) only scans are rebuilt, and their
  layers tapped."""
  uses = _uses(jaxpr)
  plans = {}
  for var, slot in slot_of_var.items():
    plan = None
    if take_dense and _dense_kernel_var(jaxpr, var, uses) is not None:
      plan = Plan("dense")
    else:
      live = _live_uses(jaxpr, var, uses)
      if len(live) == 1 and live[0][0] < len(jaxpr.eqns):
        index, position = live[0]
        plan = _plan_in(jaxpr.eqns[index], index, position, slot, in_scan,
                        take_dense)
    if plan is None and in_scan:
      plan = Plan("tap")
    if plan is not None:
      plans[slot] = plan
  return plans


def _plan_in(eqn, index: int, position: int, slot: int, in_scan: bool,
             take_dense: bool) -> Optional[Plan]:
  """The plan for a slot whose one use is operand ``position`` of ``eqn``."""
  body, _ = _body(eqn) if eqn.primitive.name in (_REMAT, _SCAN) else (None,
                                                                      None)
  if eqn.primitive.name == _REMAT and take_dense:
    inner = _plans(body, {body.invars[position]: slot}, False, True)
    if inner.get(slot, Plan("none")).kind == "dense":
      return Plan("remat", index)
  elif eqn.primitive.name == _SCAN and not in_scan:
    first_xs = eqn.params["num_consts"] + eqn.params["num_carry"]
    if position >= first_xs:
      inner = _plans(body, {body.invars[position]: slot}, True, take_dense)
      if slot in inner:
        return Plan("scan", index, int(eqn.params["length"]))
  return None


def plan(jaxpr, slot_of_var: dict, take_dense: bool = True) -> dict:
  """slot -> :class:`Plan` (``"remat"`` or ``"scan"``) of the slots of
  ``slot_of_var`` (input variable of the loss's jaxpr -> slot) taken over
  inside a checkpoint or a scan (without ``take_dense``: scans only, each
  layer tapped)."""
  plans = _plans(jaxpr, slot_of_var, False, take_dense)
  return {slot: p for slot, p in plans.items() if p.kind in ("remat", "scan")}


def _bind(eqn, values):
  params = eqn.primitive.get_bind_params(eqn.params)
  out = eqn.primitive.bind(*values, **params)
  return out if eqn.primitive.multiple_results else [out]


def _read(env, var):
  return var.val if isinstance(var, jex_core.Literal) else env[var]


class _Chain:
  """The chain as the evaluation of one jaxpr sees it: held here (a body),
  or the current variables of the traced forward pass (top level), where
  the chained taps and Dense calls already in the jaxpr thread it."""

  def __init__(self, env: dict, value=None, variables=None):
    self.env, self.value = env, value
    self.variables = None if variables is None else list(variables)

  def get(self):
    if self.variables is None:
      return self.value
    return tuple(_read(self.env, v) for v in self.variables)

  def set(self, value):
    if self.variables is None:
      self.value = value
    else:
      # The next chained call reads the chain's current variables.
      self.env.update(zip(self.variables, value))

  def follow(self, eqn):
    """After a chained call of the jaxpr itself: its outputs are next."""
    if self.variables is not None and any(
        v in self.variables for v in eqn.invars
        if not isinstance(v, jex_core.Literal)):
      # The chain's leaves are a chained call's last outputs.
      self.variables = list(eqn.outvars[-len(self.variables):])


def evaluate(jaxpr, consts, args, slot_of_var: dict, norms: dict, hooks: Hooks,
             tokens: dict, *, chain=None, chain_vars=None, in_scan=False):
  """Evaluates ``jaxpr`` with the slots of ``slot_of_var`` taken over.

  Args:
    jaxpr, consts, args: what to evaluate (an open jaxpr, its constants and
      inputs).
    slot_of_var: input variable -> slot, for the parameters to take over.
    norms: slot -> its norm sink (a layer's, inside a scan).
    hooks: the lean Dense and the chained tap.
    tokens: filled with slot -> control token (a layer's, inside a scan).
    chain: the chain's value (a body), or
    chain_vars: the chain's input variables (the traced forward pass).
    in_scan: ``jaxpr`` is a scan's body (parameters are layer slices).

  Returns:
    ``(outputs, chain)``.
  """
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  chain = _Chain(env, chain, chain_vars)
  plans = _plans(jaxpr, slot_of_var, in_scan, hooks.dense is not None)
  var_of_slot = {slot: var for var, slot in slot_of_var.items()}
  uses = _uses(jaxpr)
  kernel_slot, rebuilt = {}, {}
  for slot, p in sorted(plans.items()):
    var = var_of_slot[slot]
    if p.kind == "tap":
      env[var], tokens[slot], value = hooks.tap(slot, env[var], chain.get(),
                                                norms[slot])
      chain.set(value)
    elif p.kind == "dense":
      kernel_slot[_dense_kernel_var(jaxpr, var, uses)] = slot
    else:
      rebuilt.setdefault(p.eqn, []).append(slot)
  for index, eqn in enumerate(jaxpr.eqns):
    ins = [_read(env, v) for v in eqn.invars]
    slot = (kernel_slot.get(eqn.invars[1])
            if eqn.primitive.name == "dot_general" else None)
    if slot is not None:
      out, tokens[slot], value = hooks.dense(
          slot, ins[0], ins[1], eqn.params["precision"], chain.get(),
          norms[slot])
      chain.set(value)
      outs = [out]
    elif index in rebuilt:
      taken = {v: slot_of_var[v] for v in eqn.invars
               if v in slot_of_var and slot_of_var[v] in rebuilt[index]}
      rebuild = _rebuild_remat if eqn.primitive.name == _REMAT else \
          _rebuild_scan
      outs, value = rebuild(eqn, ins, taken, norms, hooks, tokens,
                            chain.get())
      chain.set(value)
    else:
      outs = _bind(eqn, ins)
      chain.follow(eqn)
    env.update(zip(eqn.outvars, outs))
  return [_read(env, v) for v in jaxpr.outvars], chain.get()


def _inner_slots(eqn, taken: dict) -> dict:
  """Body input -> slot for the outer variables ``taken`` (-> slot)."""
  body, _ = _body(eqn)
  return {body.invars[i]: taken[v] for i, v in enumerate(eqn.invars)
          if v in taken}


def _rebuild_remat(eqn, ins, taken, norms, hooks, tokens, chain):
  body, consts = _body(eqn)
  inner = _inner_slots(eqn, taken)
  order = sorted(set(inner.values()))

  def rebuilt(chain, sinks, *values):
    found: dict = {}
    outs, chain = evaluate(body, consts, values, inner, dict(zip(order, sinks)),
                           hooks, found, chain=chain)
    return outs, tuple(found[s] for s in order), chain

  outs, found, chain = jax.checkpoint(
      rebuilt, prevent_cse=eqn.params["prevent_cse"],
      policy=eqn.params["policy"])(chain, tuple(norms[s] for s in order),
                                   *ins)
  tokens.update(zip(order, found))
  return outs, chain


def _rebuild_scan(eqn, ins, taken, norms, hooks, tokens, chain):
  body, consts = _body(eqn)
  num_consts, num_carry = eqn.params["num_consts"], eqn.params["num_carry"]
  inner = _inner_slots(eqn, taken)
  order = sorted(set(inner.values()))
  fixed = ins[:num_consts]

  def step(carry, xs):
    chain, carry = carry
    xs, sinks = xs
    found: dict = {}
    outs, chain = evaluate(
        body, consts, list(fixed) + list(carry) + list(xs), inner,
        dict(zip(order, sinks)), hooks, found, chain=chain, in_scan=True)
    return ((chain, outs[:num_carry]),
            (outs[num_carry:], tuple(found[s] for s in order)))

  (chain, carry), (ys, found) = lax.scan(
      step, (chain, list(ins[num_consts:num_consts + num_carry])),
      (list(ins[num_consts + num_carry:]), tuple(norms[s] for s in order)),
      length=eqn.params["length"], reverse=eqn.params["reverse"],
      unroll=eqn.params["unroll"])
  tokens.update(zip(order, found))
  return list(carry) + list(ys), chain
