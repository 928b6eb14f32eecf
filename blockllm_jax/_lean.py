"""Lean training steps: compute only the gradients a block optimizer uses.

``jax.value_and_grad`` returns the whole gradient tree, and a block optimizer
then throws most of it away: the train step holds every gradient at once
(DESIGN.md tier A). :func:`lean_value_and_grad` returns a
:class:`LeanGradients` instead, a *deferred* backward pass that the
optimizer's ``update`` runs itself, asking for exactly what it needs:

- tier B (gradient-lean): every parameter leaf passes through an identity
  "tap" (``jax.custom_vjp``) whose backward rule receives that leaf's
  gradient the moment the backward pass produces it and immediately reduces
  it to what was asked: written into a packed buffer at the optimizer's
  offset (selected leaves), a squared norm (steps that may reselect), or
  nothing. So no more than a few leaf gradients are alive at a time, and
  gradients nobody asked for are dead code that XLA removes.
- tier C (compute-lean): calls of ``flax.linen.Dense`` are intercepted
  (``nn.intercept_methods``) and computed by a dense product whose backward
  computes the weight gradient ``x^T dy`` under a ``lax.cond``: an
  unselected layer skips the matmul at run time, while the activation
  gradient ``dy W^T`` is always computed. With layers taken over, a
  "chain" is threaded through them and the remaining taps, and on one
  device it carries the optimizer's moments themselves: each selected
  leaf's gradient is folded into its windows of ``mu`` / ``nu`` as it
  arrives (:meth:`LeanGradients.backward` with ``moments=``), so not even a
  packed gradient exists; otherwise the chain carries the packed gradient.
  Layers inside ``jax.checkpoint`` / ``lax.scan`` (``nn.remat`` /
  ``nn.scan``) are taken over by rebuilding those equations of the loss's
  jaxpr (:mod:`blockllm_jax._lean_transforms`); a scanned leaf's control
  token and norm have one row per layer.

What to compute is decided by the optimizer after the forward pass, from its
state and the loss: static choices (which leaves can ever be needed) are
read by the backward rules when ``update`` traces the backward pass, and
per-step choices (selected or not, offset, norm wanted) reach each tap as
the cotangent of a small "control token" that the tap returns next to the
parameter. Everything stays inside one compiled step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from blockllm_jax import _engine
from blockllm_jax import _introspect
from blockllm_jax import _layout
from blockllm_jax import _lean_transforms
from blockllm_jax import _nnx

# An offset travels through the float32 control token as the bits of a
# normal float, ``offset + 2**23`` (2**23: the bits of the smallest normal
# float), so that no flush of denormals can change it and decoding is a
# bit cast and a subtraction. The largest finite float's bits bound it.
_OFFSET_BIAS = 1 << 23
# The longest buffer a lean step addresses (2**31 - 2**24): its last
# offset's bits are then the largest finite float's.
_MAX_CAPACITY = 0x7F800000 - _OFFSET_BIAS
_CONTROL = 2  # mode, offset
# A control's mode: the sum of what the pass asks of the leaf (one value:
# "anything asked" is then one comparison, per leaf, in the compiled step).
_PACKED, _NORM = 2, 1


def _encode_offset(offset) -> jax.Array:
  return lax.bitcast_convert_type(
      jnp.asarray(offset, jnp.int32) + _OFFSET_BIAS, jnp.float32)


class _Control(NamedTuple):
  """A leaf's control token, decoded (:func:`_decode_control`)."""

  mode: jax.Array  # float32[] _PACKED (write the window) + _NORM (norm)
  offset: jax.Array  # int32[] start of the leaf's packed window

  @property
  def need_packed(self) -> jax.Array:
    return self.mode >= _PACKED

  @property
  def need_norm(self) -> jax.Array:
    return (self.mode == _NORM) | (self.mode == _PACKED + _NORM)

  @property
  def asked(self) -> jax.Array:
    return self.mode > 0


def _decode_control(control) -> _Control:
  # lax.index_in_dim, not ``control[k]``: jnp indexing costs milliseconds
  # of tracing per call, once per leaf.
  mode, offset = (lax.index_in_dim(control, k, keepdims=False)
                  for k in range(_CONTROL))
  return _Control(mode=mode, offset=lax.bitcast_convert_type(
      offset, jnp.int32) - _OFFSET_BIAS)


class _MeshPacking(NamedTuple):
  """Where each device writes its shards into the packed gradient (static).

  The packed gradient is then the optimizer's sharded buffer layout: one
  slice of ``local_capacity`` per device (``buffer_spec``), holding that
  device's shard of each asked leaf, flattened, at the leaf's offset.
  """

  mesh: Any
  buffer_spec: Any  # PartitionSpec of the packed gradient.
  specs: tuple  # PartitionSpec per slot (None: not a parameter of `leaves`).
  local_sizes: tuple  # int per slot: coordinates of one device's shard.
  local_capacity: int


@dataclasses.dataclass
class _Request:
  """Static part of one backward pass, read by the backward rules when the
  optimizer traces it (they run at that time, not at the forward pass)."""

  live: tuple = ()  # bool per slot: the slot's gradient may be used.
  dense: tuple = ()  # bool per slot: return the slot's whole gradient.
  want_packed: bool = False
  want_norms: bool = False
  mesh: Optional[_MeshPacking] = None  # None: one device.
  # Fused moments: the chain carries (mu, nu[, salt]) and each asked leaf's
  # gradient updates its windows with Adam's rule as it arrives
  # (``_engine.AdamSettings``); None: the chain carries a packed gradient.
  fused: Any = None


class _Sinks:
  """What the backward rules reduce into, and the current request.

  One object per forward pass, passed to the ``custom_vjp`` rules as a
  static argument (a plain object: hashable by identity). Each
  :meth:`LeanGradients.backward` call sets ``request`` before it traces
  the rules.
  """

  def __init__(self, capacity: int, packed_dtype, num_slots: int,
               chained: bool = False):
    self.capacity = capacity
    self.packed_dtype = packed_dtype
    self.num_slots = num_slots
    # Taps thread the chain too (compute-lean), so that moments can be
    # updated in the backward pass; else they add into a packed sink.
    self.chained = chained
    # Per slot: the layers a scan slices it into (1: not scanned); a
    # scanned slot's control and norm have one row per layer.
    self.layers = (1,) * num_slots
    self.request = _Request()

  @property
  def salted(self) -> bool:
    """The chain carries the seed of the moments' stochastic rounding: only
    for moments narrower than float32 (each element of the chain is an
    operand and a result of every Dense's conditional)."""
    return self.chained and jnp.dtype(self.packed_dtype).itemsize < 4

  def salt_leaves(self, salt: Optional[jax.Array] = None) -> tuple:
    """The chain's last leaves: ``(float32 salt,)`` if :attr:`salted`
    (``salt``, int32[], else zero), else none. Salts stay exact in float32
    below 2**24."""
    if not self.salted:
      return ()
    if salt is None:
      return (jnp.zeros([], jnp.float32),)
    return ((jnp.asarray(salt, jnp.int32) % (1 << 24)).astype(jnp.float32),)


class _LeafRule(NamedTuple):
  """What one leaf's backward rule does, static and hashable: the rules of
  leaves with equal rules and shapes (the same projection in every layer)
  are traced once (:func:`blockllm_jax._engine.traced_once`)."""

  capacity: int  # length of the packed buffer (of each device's slice)
  packed_dtype: Any  # dtype of the packed buffer
  packs: bool  # the pass writes packed windows and the leaf fits
  want_norms: bool  # the pass reports squared norms
  fused: Any  # _engine.AdamSettings: moments in the chain; None: a packed one
  mesh: Any = None  # jax Mesh of sharded parameters; None: one device
  spec: Any = None  # the leaf's PartitionSpec on ``mesh``
  buffer_spec: Any = None  # the packed buffer's PartitionSpec on ``mesh``


def _leaf_rule(sinks: _Sinks, slot: int, shape) -> _LeafRule:
  """The current request's rule for the leaf in ``slot`` (of ``shape``).

  A leaf larger than the packed buffer (its shard, on a mesh) is never
  selected and writes nothing.
  """
  request = sinks.request
  mesh = request.mesh
  if mesh is None:
    return _LeafRule(
        capacity=sinks.capacity, packed_dtype=sinks.packed_dtype,
        packs=request.want_packed and int(np.prod(shape)) <= sinks.capacity,
        want_norms=request.want_norms, fused=request.fused)
  return _LeafRule(
      capacity=mesh.local_capacity, packed_dtype=sinks.packed_dtype,
      packs=(request.want_packed and
             mesh.local_sizes[slot] <= mesh.local_capacity),
      want_norms=request.want_norms, fused=request.fused, mesh=mesh.mesh,
      spec=mesh.specs[slot], buffer_spec=mesh.buffer_spec)


def _shard_like_param(rule: _LeafRule, grad):
  if rule.mesh is None:
    return grad
  return lax.with_sharding_constraint(grad, NamedSharding(rule.mesh,
                                                          rule.spec))


def _add_window(rule: _LeafRule, packed, grad, need, offset):
  """``packed`` plus ``grad`` (flattened) on its window at ``offset`` if
  ``need``; ``packed=None`` starts from zeros.

  On a mesh each device adds its own shard of ``grad`` to its own slice of
  ``packed`` (a ``shard_map``): nothing crosses devices.
  """
  dtype = rule.packed_dtype

  def add(grad, need, offset, *packed):
    flat = grad.reshape(-1).astype(dtype)
    flat = jnp.where(need, flat, jnp.zeros_like(flat))
    if not packed:
      # ``zeros + dus(zeros, g, offset)`` is what XLA rewrites into an
      # in-place update of the accumulated buffer, so each leaf costs its
      # own size, not the buffer's.
      return lax.dynamic_update_slice(jnp.zeros([rule.capacity], dtype),
                                      flat, (offset,))
    window = lax.dynamic_slice(packed[0], (offset,), (flat.shape[0],))
    return lax.dynamic_update_slice(packed[0], window + flat, (offset,))

  # Without this, XLA may sum the gradient whole on every device (an
  # all-reduce) and slice it, instead of reduce-scattering it to shards.
  grad = _shard_like_param(rule, grad)
  args = (grad, need, offset) + (() if packed is None else (packed,))
  if rule.mesh is None:
    return add(*args)
  specs = (rule.spec, P(), P()) + (() if packed is None
                                   else (rule.buffer_spec,))
  return jax.shard_map(add, mesh=rule.mesh, in_specs=specs,
                       out_specs=rule.buffer_spec, check_vma=False)(*args)


def _reduce_into(rule: _LeafRule, chain, grad, control: _Control, *,
                 asked: bool = False):
  """A leaf gradient reduced into the chain: ``(chain, norm_ct value)``.

  Packed passes add the gradient's window to the packed gradient. Fused
  passes fold it into the moments' windows, which stay as they were if
  the gradient is not finite (or its squared norm overflows float32), and
  report the squared norm of every packed leaf (its finiteness is the
  caller's) as well as of those asked for. ``asked``: the caller runs this
  only when the leaf's window or norm is asked for (a Dense's conditional
  weight gradient), so the fused pass's norm needs no mask.
  """
  if rule.fused is None:
    square = (_engine.squared_norm(grad) if rule.want_norms
              else jnp.zeros([], jnp.float32))
    if rule.packs:
      packed = _add_window(rule, chain[0], grad, control.need_packed,
                           control.offset)
      chain = (packed,) + tuple(chain[1:])
    return chain, jnp.where(control.need_norm, square, 0.0)
  # One reduction for both the finiteness of a packed leaf and a norm: a
  # leaf whose squared norm overflows float32 keeps its moments (its score
  # is not finite).
  square = _engine.squared_norm(grad)
  if rule.packs:
    mu, nu, *salt = chain
    mu, nu = _engine.update_window_moments(
        mu, nu, grad, control.offset,
        control.need_packed & jnp.isfinite(square),
        rule.fused, salt[0].astype(jnp.int32) if salt else None)
    chain = (mu, nu, *salt)
  if asked:
    return chain, square
  return chain, jnp.where(control.asked, square, 0.0)


def _reduce_gradient(rule: _LeafRule, grad, control):
  """A leaf gradient -> (packed contribution, norm contribution)."""
  control = _decode_control(control)
  packed_ct = norm_ct = None
  if rule.packs:
    # An unasked leaf adds zeros to a window.
    packed_ct = _add_window(rule, None, grad, control.need_packed,
                            control.offset)
  if rule.want_norms:
    norm_ct = jnp.where(control.need_norm, _engine.squared_norm(grad), 0.0)
  return packed_ct, norm_ct


@_engine.traced_once(num_static=1)
def _tap_reduce(rule: _LeafRule, grad, control, chain):
  """A chained tap's backward rule: ``(chain, norm_ct value)``."""
  return _reduce_into(rule, chain, grad, _decode_control(control))


@_engine.traced_once(num_static=4)
def _dense_reduce(rule: _LeafRule, kernel_dtype, param_dtype, precision,
                  inputs, out_grad, control, chain):
  """A taken-over Dense's weight gradient, computed only if the pass asks
  for its window or norm, reduced into the chain: ``(chain, square)``."""
  decoded = _decode_control(control)
  if rule.packs and rule.want_norms:
    wanted = decoded.asked
  elif rule.packs:
    wanted = decoded.need_packed
  elif rule.want_norms:
    wanted = decoded.need_norm
  else:
    wanted = jnp.zeros([], bool)

  def reduce(chain, control):
    # Decoded again in here, where XLA fuses the decoding into its uses,
    # instead of materialising each flag as an operand of the cond.
    grad = _dense_weight_grad(rule, precision, inputs, out_grad, kernel_dtype)
    return _reduce_into(rule, chain, grad.astype(param_dtype),
                        _decode_control(control), asked=True)

  def skip(chain, control):
    del control
    return chain, jnp.zeros([], jnp.float32)

  # The point of tier C: an unselected layer skips the matmul.
  return lax.cond(wanted, reduce, skip, chain, control)


def _dense_weight_grad(rule: _LeafRule, precision, inputs, out_grad, dtype):
  # As [tokens, features] matrices contracted on their first axis: XLA
  # then calls the matmul with a transposed operand, where contracting the
  # batch axes in place gave each weight gradient a transposed copy of its
  # inputs (a copy at run time and three instructions to compile).
  rows = lambda x: x.reshape(-1, x.shape[-1])
  return _shard_like_param(rule, lax.dot_general(
      rows(inputs), rows(out_grad), (((0,), (0,)), ((), ())),
      precision=precision).astype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tap(sinks: _Sinks, slot: int, param, packed_sink, norm_sink):
  """Identity on ``param`` plus a control token; see the module doc."""
  del sinks, slot, packed_sink, norm_sink
  return param, jnp.zeros([_CONTROL], jnp.float32)


# The forward rules call the undecorated functions (``.fun``): calling the
# custom_vjp functions there would trace each call twice.
def _tap_fwd(sinks, slot, param, packed_sink, norm_sink):
  return _tap.fun(sinks, slot, param, packed_sink, norm_sink), None


def _tap_bwd(sinks, slot, residual, cotangents):
  del residual
  grad, control = cotangents
  if not sinks.request.live[slot]:
    return None, None, None
  packed_ct, norm_ct = _reduce_gradient(_leaf_rule(sinks, slot, grad.shape),
                                        grad, control)
  dense_ct = grad if sinks.request.dense[slot] else None
  return dense_ct, packed_ct, norm_ct


_tap.defvjp(_tap_fwd, _tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chained_tap(sinks: _Sinks, slot: int, param, chain, norm_sink):
  """:func:`_tap` that also threads the chain (see :func:`_lean_dense`):
  its backward rule writes the leaf's window into the chain in place."""
  del sinks, slot, norm_sink
  return param, jnp.zeros([_CONTROL], jnp.float32), chain


def _chained_tap_fwd(sinks, slot, param, chain, norm_sink):
  return _chained_tap.fun(sinks, slot, param, chain, norm_sink), None


def _chained_tap_bwd(sinks, slot, residual, cotangents):
  del residual
  grad, control, chain = cotangents
  request = sinks.request
  if not request.live[slot]:
    return None, chain, None
  chain, norm = _tap_reduce(_leaf_rule(sinks, slot, grad.shape), grad,
                            control, chain)
  norm_ct = norm if request.want_norms else None
  return (grad if request.dense[slot] else None), chain, norm_ct


_chained_tap.defvjp(_chained_tap_fwd, _chained_tap_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _lean_dense(sinks: _Sinks, slot: int, param_dtype, precision, inputs,
                kernel, packed_chain, norm_sink):
  """``inputs @ kernel`` (last axis) whose weight gradient is conditional.

  Returns ``(outputs, control token, packed_chain)``. ``packed_chain`` is
  passed on unchanged: the forward pass threads it through the intercepted
  calls in execution order, so that the backward pass threads the packed
  gradient through them in reverse and each call writes its window in place
  (inside its ``lax.cond``: a skipped layer then costs nothing, where
  returning a contribution would cost a leaf-sized zero array).
  """
  del sinks, slot, param_dtype, norm_sink
  return (_contract(inputs, kernel, precision),
          jnp.zeros([_CONTROL], jnp.float32), packed_chain)


def _contract(inputs, kernel, precision):
  return lax.dot_general(inputs, kernel,
                         (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


def _lean_dense_fwd(sinks, slot, param_dtype, precision, inputs, kernel,
                    packed_chain, norm_sink):
  outputs = _lean_dense.fun(sinks, slot, param_dtype, precision, inputs,
                            kernel, packed_chain, norm_sink)
  return outputs, (inputs, kernel)


def _lean_dense_bwd(sinks, slot, param_dtype, precision, residual,
                    cotangents):
  inputs, kernel = residual
  out_grad, control, packed = cotangents
  # The activation gradient flows on whatever the optimizer wants.
  input_grad = lax.dot_general(
      out_grad, kernel, (((out_grad.ndim - 1,), (1,)), ((), ())),
      precision=precision).astype(inputs.dtype)
  request = sinks.request
  if not request.live[slot]:
    return input_grad, None, packed, None
  rule = _leaf_rule(sinks, slot, kernel.shape)
  kernel_grad = None
  if request.dense[slot]:
    kernel_grad = _dense_weight_grad(rule, precision, inputs, out_grad,
                                     kernel.dtype)
    packed, square = _tap_reduce(rule, kernel_grad.astype(param_dtype),
                                 control, packed)
  else:
    packed, square = _dense_reduce(rule, kernel.dtype, param_dtype,
                                   precision, inputs, out_grad, control,
                                   packed)
  norm_ct = square if request.want_norms else None
  return input_grad, kernel_grad, packed, norm_ct


_lean_dense.defvjp(_lean_dense_fwd, _lean_dense_bwd)


def _is_plain_dense(module) -> bool:
  """A ``flax.linen.Dense`` whose product we can reproduce exactly."""
  return (isinstance(module, nn.Dense)
          and type(module).__call__ is nn.Dense.__call__
          and module.dot_general is None and module.dot_general_cls is None
          and module.promote_dtype is nn.dtypes.promote_dtype)


class _DenseInterceptor:
  """Routes plain ``nn.Dense`` (linen, an ``nn.intercept_methods`` hook) and
  ``nnx.Linear`` calls whose kernel is one of our leaves to ``dense(module,
  inputs, kernel, slot)``; see :meth:`installed`.

  A call is taken only at the trace level of the loss function: inside
  ``nn.remat``, ``nn.scan``, ``vmap`` etc. the kernel is another object or
  the trace differs, and the call runs unchanged (``_lean_transforms``
  then takes the layers of checkpoints and scans over).
  """

  def __init__(self, slot_of_object: dict, dense: Callable):
    self.slot_of_object = slot_of_object
    self.dense = dense
    self.trace_state = jex_core.get_opaque_trace_state(convention="flax")
    self.calls: dict = {}
    # Dense calls not taken over: module path -> why (for the warning).
    self.passed_over: dict = {}

  @contextlib.contextmanager
  def installed(self):
    """Active while the loss function is traced: linen and NNX hooks."""
    with nn.intercept_methods(self), _nnx.linear_hook(self):
      yield

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
        or not module.has_variable("params", "kernel")):  # or initialisation
      return next_fun(*args, **kwargs)
    where = lambda: "/".join(str(p) for p in (module.scope.path if module.scope
                                               else ())) or type(module).__name__
    if not _is_plain_dense(module) or len(args) != 1 or kwargs:
      self.passed_over[where()] = ("a custom __call__ / dot_general / "
                                   "promote_dtype or call arguments")
      return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = (module.get_variable("params", "bias") if module.use_bias
            else None)
    outputs = self.take(module, args[0], kernel, bias, module.dtype, where)
    return next_fun(*args, **kwargs) if outputs is None else outputs

  def take(self, module, inputs, kernel, bias, dtype, where: Callable[[], str]):
    """The layer's outputs through ``dense``, or None (recorded in
    ``passed_over`` under ``where()``) when the call is not ours to take."""
    slot = self.slot_of_object.get(id(kernel))
    same_trace = (jex_core.get_opaque_trace_state(convention="flax")
                  == self.trace_state)
    if slot is None or not same_trace:
      self.passed_over[where()] = (
          "inside a transformed function (nn.scan, nn.remat, vmap, ...)"
          if not same_trace else "its kernel is not a parameter leaf")
      return None
    self.calls[slot] = self.calls.get(slot, 0) + 1
    # Promotion as the layer does it, but the kernel is cast by `dense`, so
    # that planning sees no operation on the leaf itself.
    dtype = dtype or jnp.result_type(
        *[a for a in (inputs, kernel, bias) if a is not None])
    inputs = jnp.asarray(inputs, dtype)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    outputs = self.dense(module, inputs, kernel, slot)
    if bias is not None:
      outputs += jnp.reshape(bias, (1,) * (outputs.ndim - 1) + (-1,))
    return outputs


class LeanResult(NamedTuple):
  """What one backward pass of :class:`LeanGradients` returns.

  ``packed`` holds the asked leaves' gradients at their offsets (zeros
  elsewhere), ``norm_sq`` the squared norms asked for (0 elsewhere),
  ``dense`` the whole gradient of each leaf asked for in ``dense`` (None
  for the others). Leaves are those passed to :meth:`LeanGradients.backward`.
  After a fused pass (``moments=``) ``packed`` is None, ``moments`` holds
  the updated moments and ``norm_sq`` also holds each packed leaf's squared
  norm (non-finite: that leaf's windows were left as they were).
  """

  packed: Optional[jax.Array]  # packed_dtype[capacity]
  norm_sq: Optional[jax.Array]  # float32[len(leaves)]
  dense: list
  moments: Optional[tuple] = None  # (mu, nu) after a fused pass


@dataclasses.dataclass
class PackedStep:
  """What a lean backward pass on sharded parameters produced, as one
  device sees it inside the update's ``shard_map`` (a plain holder, made
  there; not a pytree).

  The backward pass is the model's and runs on the global view (outside
  ``shard_map``); only the per-device rest of the update runs inside.
  """

  params_like: Any  # the parameters' local shapes (ShapeDtypeStruct tree)
  packed: jax.Array  # packed_dtype[local capacity]: the device's slice
  dense: Sequence = ()  # per eligible leaf: its local gradient shard or None
  # What the optimizer decided on the global view (replicated arrays; e.g.
  # BlockLLM's finiteness and new selection), or None.
  decision: Any = None


class LeanGradients:
  """A deferred backward pass, returned by :func:`lean_value_and_grad`.

  Pass it to ``tx.update`` of :func:`blockllm_jax.blockllm`,
  :func:`blockllm_jax.badam` or :func:`blockllm_jax.bread` (or their
  ``scale_by_*`` at the head of an ``optax.chain``) in place of the gradient
  tree: the transformation runs the backward pass asking only for what its
  step uses. It is deliberately not a pytree, so a transformation that
  expects gradient arrays fails loudly instead of computing on a stand-in.
  Use it inside the same ``jax.jit`` as the call that made it.

  Attributes:
    capacity: coordinates of the packed gradient (the optimizer's buffers).
    packed_dtype: dtype of the packed gradient (the optimizer's moments).
    params_like: the parameters as ``jax.ShapeDtypeStruct`` leaves.
    treedef: structure of the parameters.
    compute_lean: flat positions of the leaves whose weight gradient is
      computed only when asked (tier C).
  """

  def __init__(self, vjp_fn, loss, slot_of_leaf, sinks, params_like,
               compute_lean, linearize):
    self._vjp_fn = vjp_fn
    self._linearize = linearize
    self.params_like = params_like
    treedef = jax.tree_util.tree_structure(params_like)
    self._loss = loss
    self._slot_of_leaf = slot_of_leaf
    self._sinks = sinks
    self.treedef = treedef
    self.compute_lean = compute_lean
    self.capacity = sinks.capacity
    self.packed_dtype = sinks.packed_dtype
    # Moments can be updated in the backward pass (:meth:`backward`):
    # compute-lean layers thread the chain (tier B alone may thread it
    # through scans, but then packs: in a loop XLA would keep its taps'
    # gradients alive).
    self.fused_capable = sinks.chained and bool(compute_lean)
    flat = jax.tree_util.tree_flatten_with_path(params_like)[0]
    self._slot_shapes = [None] * sinks.num_slots
    self._slot_paths = [None] * sinks.num_slots
    for position, slot in enumerate(slot_of_leaf):
      if slot is not None:
        self._slot_paths[slot] = _layout.path_to_str(flat[position][0])
        self._slot_shapes[slot] = flat[position][1].shape

  def recompute(self) -> "LeanGradients":
    """The same deferred gradient from a fresh forward pass.

    A backward pass inside ``lax.cond`` that used this object's forward
    activations would keep all of them alive for the whole branch (and XLA
    copies operands that are used again after the branch); a branch that
    needs a second backward pass recomputes the forward instead.
    """
    return self._linearize()[2]

  def _mesh_packing(self, mesh_plan) -> Optional[_MeshPacking]:
    if mesh_plan is None:
      return None
    devices = int(mesh_plan.num_devices)
    if self.capacity % devices:
      raise ValueError(
          f"The packed gradient's {self.capacity} coordinates do not split "
          f"over {devices} devices: was the optimizer state initialised "
          "with the same `param_sharding`?")
    specs = [None] * self._sinks.num_slots
    local_sizes = [0] * self._sinks.num_slots
    for position, slot in enumerate(self._slot_of_leaf):
      if slot is not None:
        specs[slot] = mesh_plan.specs[position]
        local_sizes[slot] = int(np.prod(mesh_plan.local_shapes[position]))
    return _MeshPacking(mesh=mesh_plan.mesh,
                        buffer_spec=mesh_plan.buffer_spec,
                        specs=tuple(specs), local_sizes=tuple(local_sizes),
                        local_capacity=self.capacity // devices)

  def zeros_packed(self, mesh_plan: Any = None) -> jax.Array:
    """A zero packed gradient (on a mesh, in the sharded buffer layout:
    never whole on one device)."""
    zeros = jnp.zeros([self.capacity], self.packed_dtype)
    if mesh_plan is None:
      return zeros
    return lax.with_sharding_constraint(
        zeros, NamedSharding(mesh_plan.mesh, mesh_plan.buffer_spec))

  def backward(self, leaves: Sequence[int], *,
               packed: Optional[jax.Array] = None,
               offset: Optional[jax.Array] = None,
               norms: Optional[jax.Array] = None,
               dense: Sequence[bool] = (),
               mesh_plan: Any = None,
               moments: Optional[tuple] = None,
               adam: Any = None,
               salt: Optional[jax.Array] = None) -> LeanResult:
    """Runs the backward pass for ``leaves`` (flat positions, static).

    Args:
      leaves: flat positions (``treedef`` order) of the leaves whose
        gradients may be used; the others are never computed.
      packed: bool[len(leaves)]: write the leaf's gradient into the packed
        vector at ``offset``; None: no packed vector.
      offset: int32[len(leaves)], needed with ``packed``.
      norms: bool[len(leaves)]: compute the leaf's squared gradient norm;
        None: no norms.
      dense: static bool per leaf: return its whole gradient.
      mesh_plan: ``None`` (one device), or the ``_sharding.MeshPlan`` of
        sharded parameters: the packed vector is then the sharded buffer
        layout (each device's shards in its own slice of
        ``capacity / devices``, ``offset`` local to the slice). Norms are
        of whole leaves either way.
      moments: ``(mu, nu)``: update them with Adam's rule (``adam``, an
        ``_engine.AdamSettings``) from each packed leaf's gradient as the
        backward pass produces it, in place, instead of returning a packed
        gradient (no buffer of the moments' size beyond the moments);
        moments narrower than float32 are rounded stochastically with
        ``salt`` (int32[], the step count). Needs compute-lean and one
        device.

    Returns:
      A :class:`LeanResult`.
    """
    num_slots = self._sinks.num_slots
    slots = []
    for position in leaves:
      slot = self._slot_of_leaf[position]
      if slot is None:
        raise ValueError(f"Leaf {position} is not a float parameter leaf.")
      slots.append(slot)
    rows = self._unit_rows(slots)
    if mesh_plan is not None and any(self._sinks.layers[s] > 1 for s in slots):
      raise ValueError(
          "`layer_axis` / nn.scan: a lean step on a mesh (`param_sharding`) "
          "does not take scanned layers yet; use `jax.value_and_grad` "
          "there.")
    dense = tuple(dense) or (False,) * len(slots)
    live = [False] * num_slots
    dense_slots = [False] * num_slots
    for slot, is_dense in zip(slots, dense, strict=True):
      live[slot] = True
      dense_slots[slot] = bool(is_dense)
      if is_dense and rows.per_layer[slot]:
        raise ValueError(
            "`layer_axis`: a lean step cannot return the whole gradient of "
            "a stacked leaf's layers (a BREAD correction); use "
            "`jax.value_and_grad` with this optimizer.")
    fused = moments is not None
    if fused and (not self.fused_capable or mesh_plan is not None or
                  packed is None):
      raise ValueError("Fused moments need `packed`, compute-lean "
                       "(`lean_value_and_grad(..., compute_lean=True)`) and one "
                       "device.")
    if fused and norms is None:
      norms = jnp.zeros([len(slots)], bool)
    request = _Request(live=tuple(live), dense=tuple(dense_slots),
                       want_packed=packed is not None,
                       want_norms=norms is not None,
                       mesh=self._mesh_packing(mesh_plan),
                       fused=adam if fused else None)
    addressed = (self.capacity if request.mesh is None
                 else request.mesh.local_capacity)
    if packed is not None and addressed > _MAX_CAPACITY:
      raise ValueError(
          f"lean_value_and_grad: the optimizer's moment buffers hold "
          f"{addressed} coordinates (per device); a lean step addresses at "
          f"most {_MAX_CAPACITY} (offsets travel as float32 bits). Train "
          "fewer coordinates per step (BlockLLM: a higher `sparsity`; "
          "BAdam: smaller blocks) or use jax.value_and_grad.")
    # One control row per layer of each slot (one for an unscanned slot),
    # read from its unit: a whole scanned stack taken as one unit spreads
    # over its layers' consecutive windows.
    unit = jnp.asarray(np.maximum(rows.unit, 0))
    asked = jnp.asarray(rows.unit >= 0)
    control = [jnp.zeros(rows.unit.shape, jnp.float32),
               _encode_offset(jnp.zeros(rows.unit.shape, jnp.int32))]
    if packed is not None:
      if offset is None:
        raise ValueError("`packed` needs `offset`.")
      at = jnp.asarray(offset, jnp.int32)[unit] + jnp.asarray(rows.shift)
      control[0] = _PACKED * jnp.where(
          asked, jnp.asarray(packed, jnp.float32)[unit], 0)
      control[1] = _encode_offset(jnp.where(asked, at, 0))
    if norms is not None:
      control[0] = control[0] + _NORM * jnp.where(
          asked, jnp.asarray(norms, jnp.float32)[unit], 0)
    # The backward rules read `request` now, while this call traces them.
    self._sinks.request = request
    packed_seed = self.zeros_packed(mesh_plan)
    if self._sinks.chained:
      if fused:
        packed_seed = ((moments[0], moments[1])
                       + self._sinks.salt_leaves(salt))
      else:
        packed_seed = ((packed_seed, jnp.zeros_like(packed_seed))
                       + self._sinks.salt_leaves())
    # Each slot's control arrives as an array of its own (not a slice of
    # the matrix), so that same-shaped leaves share compiled kernels.
    # A scanned slot's rows are one [layers, _CONTROL] slice (the program
    # does not grow with depth); the others arrive as arrays of their own.
    layers = self._sinks.layers
    single = [rows.start[slot] for slot in range(num_slots)
              if layers[slot] == 1]
    # Control values are whole numbers >= 0 (modes) and normal floats
    # (offsets): summed with zeros as floats, exactly.
    split = dict(zip(single, _engine.split_matrix(jnp.stack(
        [column[np.asarray(single, np.int64)] for column in control],
        axis=1), as_bits=False)))
    tokens = tuple(
        split[rows.start[slot]] if layers[slot] == 1 else jnp.stack(
            [column[rows.start[slot]:rows.start[slot + 1]]
             for column in control], axis=1)
        for slot in range(num_slots))
    packed_ct, norm_ct, param_cts = self._vjp_fn(
        (jnp.ones_like(self._loss), tokens, packed_seed))
    chain = packed_ct
    if self._sinks.chained:
      packed_ct = chain[0]
    return LeanResult(
        packed=packed_ct if packed is not None and not fused else None,
        moments=(chain[0], chain[1]) if fused else None,
        norm_sq=(rows.unit_norms(slots, norm_ct)
                 if norms is not None else None),
        dense=[param_cts[slot] if d else None
               for slot, d in zip(slots, dense)])


  def _unit_rows(self, slots: Sequence[int]) -> "_UnitRows":
    """The control rows of the units on ``slots`` (static)."""
    layers = self._sinks.layers
    start = np.concatenate([[0], np.cumsum(layers)]).astype(int)
    unit = np.full([start[-1]], -1, np.int64)
    shift = np.zeros([start[-1]], np.int64)
    per_layer = [False] * len(layers)
    where = {}
    for u, slot in enumerate(slots):
      where.setdefault(slot, []).append(u)
    for slot, units in where.items():
      count = layers[slot]
      rows = np.arange(start[slot], start[slot + 1])
      if len(units) == count:  # a unit per layer (or an unscanned leaf)
        unit[rows] = units
        per_layer[slot] = count > 1
      elif len(units) == 1:  # a whole scanned stack as one unit
        size = int(np.prod(self._slot_shapes[slot])) // count
        unit[rows] = units[0]
        shift[rows] = np.arange(count) * size
      else:
        sliced = (f"that nn.scan slices into {count} layers" if count > 1
                  else "that no nn.scan slices along its axis 0")
        raise ValueError(
            f"`layer_axis`: the optimizer has {len(units)} units on "
            f"{self._slot_paths[slot]}, {sliced}; a lean step needs one "
            "unit per layer of a leaf scanned along axis 0, or one for the "
            "whole leaf.")
    return _UnitRows(start=tuple(start), unit=unit, shift=shift,
                     per_layer=tuple(per_layer))


class _UnitRows(NamedTuple):
  """Control rows (static): each slot has ``layers`` consecutive rows."""

  start: tuple  # int per slot (and the end): its first row
  unit: np.ndarray  # int[rows]: the unit a row reads, -1: none
  shift: np.ndarray  # int[rows]: added to the unit's offset (whole stack)
  per_layer: tuple  # bool per slot: its units are its layers

  def unit_norms(self, slots, norm_ct) -> jax.Array:
    """Each unit's squared norm (a whole stack's: the sum of its layers');
    a stack's units are consecutive, in layer order."""
    out, unit = [], 0
    while unit < len(slots):
      slot = slots[unit]
      value = norm_ct[slot]
      if self.per_layer[slot]:
        out.append(value)
        unit += value.shape[0]
      else:
        out.append(jnp.sum(value)[None])
        unit += 1
    return jnp.concatenate(out)


def _warn_fallback(reasons: dict):
  if reasons:
    listed = "; ".join(f"{path}: {why}" for path, why in
                       sorted(reasons.items())[:6])
    more = f" (and {len(reasons) - 6} more)" if len(reasons) > 6 else ""
    warnings.warn(
        "compute_lean: these Dense layers fall back to the gradient-lean "
        f"path (their weight gradient is computed every step): {listed}{more}.",
        stacklevel=4)


def lean_value_and_grad(loss_fn: Callable, *, has_aux: bool = False,
                        compute_lean: bool = True,
                        warn: bool = True,
                        remat_policy: Any = "auto") -> Callable:
  """Loss and a deferred, lean gradient for a block optimizer.

  ``lean_value_and_grad(loss_fn)(params, opt_state, *args)`` evaluates
  ``loss_fn(params, *args)`` and returns ``(loss, grads)`` like
  ``jax.value_and_grad``, except that ``grads`` is a :class:`LeanGradients`:
  ``tx.update(grads, opt_state, params, value=loss)`` of a
  :func:`~blockllm_jax.blockllm`, :func:`~blockllm_jax.badam` or
  :func:`~blockllm_jax.bread` optimizer then runs the backward pass itself
  and computes only what its step uses. The resulting updates equal those of
  the plain path (``jax.value_and_grad`` then ``tx.update``) up to
  floating-point reassociation.

  - The full gradient tree never exists: each leaf's gradient is reduced as
    soon as it is produced (packed if selected, or to a squared norm on
    steps that reselect), and gradients no step can use are not computed
    (e.g. embeddings the optimizer may never train).
  - BlockLLM decides after the forward pass whether this step reselects (it
    needs the loss). If so, a first backward pass computes every eligible
    leaf's gradient norm, the new selection is made, and a second backward
    pass packs (or, with compute-lean layers on one device, folds into the
    moments) the newly selected gradients; other steps run one backward
    pass. Only the loss and the gradients the step uses are checked for
    non-finite values. Folded into the moments, a step whose loss is
    finite but whose gradient is not is skipped, yet the selected leaves
    with finite gradients keep that gradient in their moments (no copy is
    held to take it back); the non-finite leaf's moments are untouched.
  - ``compute_lean=True`` also intercepts ``flax.linen.Dense`` calls made
    by ``loss_fn`` (no need to edit the model) so that the weight-gradient
    matmul of a layer nobody needs this step is skipped at run time.
    Layers inside ``nn.remat`` / ``jax.checkpoint`` and ``nn.scan`` /
    ``lax.scan`` are taken over too (the checkpoint keeps its policy; a
    scan over stacked leaves reduces each layer's gradient per unit while
    its backward pass produces it, so with ``layer_axis`` each (leaf,
    layer) unit is packed on its own). Layers it cannot take over (a kernel
    also used outside its ``Dense`` call, shared between calls, broadcast
    by a scan instead of sliced, under ``vmap``, or a ``Dense`` with a
    custom ``dot_general``) keep the gradient-lean path; a warning names
    them.
  - With an optimizer built with ``param_sharding=`` (parameters on a
    mesh), the backward pass runs on the global view as XLA partitions it,
    and each device writes its own shards of the selected gradients into
    its slice of the packed gradient (the moments' layout): the packed
    gradient never crosses devices.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar loss,
      or ``(loss, aux)`` with ``has_aux=True``.
    has_aux: as in ``jax.value_and_grad``.
    compute_lean: intercept ``flax.linen.Dense`` (tier C).
    warn: warn about layers that fall back from compute-lean.
    remat_policy: which forward values the backward pass keeps, as a
      ``jax.checkpoint`` policy applied to the whole forward pass; the others
      are recomputed during the backward pass (values are unchanged).
      ``None`` keeps what ``jax.vjp`` keeps. It matters for BlockLLM, whose
      lean step runs its one or two backward passes in a ``lax.while_loop``:
      every value the backward pass needs is then held for the whole loop, in
      the form ``jax.vjp`` saved it, where a straight-line program would
      fuse it into its consumer (e.g. each layer's float32 softmax output).
      On an H200 (``gpu-350m``, bf16 activations, batch 4 x 512) the lean
      BlockLLM step's peak was 8.7 GB with ``None``, 4.4 GB with
      ``jax.checkpoint_policies.dots_saveable`` and 3.5 GB with
      ``dots_with_no_batch_dims_saveable`` (plain step 6.8 GB, AdamW 9.4 GB),
      at 22.0, 26.4 and 26.7 ms per step (plain 23.6 ms). XLA:CPU hoists the
      forward out of the loop, so there a policy costs compile time (and, for
      scanned layers, step time) and saves nothing. ``"auto"`` (default):
      ``dots_with_no_batch_dims_saveable`` on backends other than CPU for a
      model whose layers are not inside ``nn.remat`` / ``nn.scan`` (those
      keep what their own checkpoints decide), else ``None``.

  Returns:
    ``fn(params, opt_state, *args, **kwargs) -> (loss, grads)`` (``((loss,
    aux), grads)`` with ``has_aux``); ``opt_state`` is the state of the
    optimizer that will consume ``grads`` (or a state containing it).
    With Flax NNX it is ``fn(model, optimizer, *args, **kwargs)``: ``model``
    an ``nnx.Module``, ``optimizer`` the ``nnx.Optimizer`` holding our
    transformation, ``loss_fn(model, *args, **kwargs)``; ``grads`` is an
    ``nnx.State`` of the ``optimizer.wrt`` parameters (its leaves stand for
    the deferred gradient) to pass to ``optimizer.update(model, grads,
    value=loss)``. Compute-lean then takes over ``nnx.Linear`` calls
    (``nnx.LinearGeneral`` / ``nnx.Einsum`` keep the gradient-lean path, with
    a warning); other state ``loss_fn`` changes (dropout RNG counters,
    batch statistics) is written back to ``model`` as with ``nnx.grad``.

  Example:
    >>> tx = blockllm_jax.blockllm(1e-3, sparsity=0.9)
    >>> grad_fn = blockllm_jax.lean_value_and_grad(loss_fn)
    >>> @jax.jit
    ... def train_step(params, opt_state, batch):
    ...   loss, grads = grad_fn(params, opt_state, batch)
    ...   updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    ...   return optax.apply_updates(params, updates), opt_state, loss

  NNX example::

    optimizer = nnx.Optimizer(model, blockllm_jax.blockllm(1e-3), wrt=nnx.Param)
    grad_fn = blockllm_jax.lean_value_and_grad(loss_fn)  # loss_fn(model, batch)

    @nnx.jit
    def train_step(model, optimizer, batch):
      loss, grads = grad_fn(model, optimizer, batch)
      optimizer.update(model, grads, value=loss)
      return loss

  References:
    Ramesh et al., 2024 (BlockLLM). https://arxiv.org/abs/2406.17296
    Luo, Yu and Li, 2024 (BAdam). https://arxiv.org/abs/2404.02827
  """

  def nnx_functional(pure_loss):
    """The functional step for ``pure_loss -> (the user's output, model
    state)``: run with ``has_aux=True``, the state carried beside the
    user's aux; returns ``((output, model state), grads)``."""

    def with_state(tree, *inner_args, **inner_kwargs):
      out, model_state = pure_loss(tree, *inner_args, **inner_kwargs)
      loss, aux = out if has_aux else (out, None)
      return loss, (aux, model_state)

    inner = _functional(with_state, True, compute_lean, warn, remat_policy)

    def call(params, opt_state, *inner_args, **inner_kwargs):
      (loss, (aux, model_state)), grads = inner(params, opt_state, *inner_args,
                                                **inner_kwargs)
      return (((loss, aux) if has_aux else loss), model_state), grads
    return call

  if not (remat_policy is None or remat_policy == "auto" or
          callable(remat_policy)):
    raise ValueError(
        "lean_value_and_grad: remat_policy must be 'auto', None or a "
        "jax.checkpoint policy (e.g. jax.checkpoint_policies.dots_saveable); "
        f"got {remat_policy!r}.")
  functional = _functional(loss_fn, has_aux, compute_lean, warn, remat_policy)

  def value_and_lean_grad(params, opt_state, *args, **kwargs):
    if _nnx.is_module(params):
      return _nnx.lean_call(nnx_functional, loss_fn, params, opt_state, args,
                            kwargs)
    if _nnx.is_optimizer(opt_state):
      raise TypeError(
          "lean_value_and_grad(loss_fn)(model, optimizer, ...): with an "
          "nnx.Optimizer, `model` must be the nnx Module it was built for; got "
          f"{type(params).__name__}.")
    return functional(params, opt_state, *args, **kwargs)

  return value_and_lean_grad


def _functional(loss_fn: Callable, has_aux: bool, compute_lean: bool,
                warn: bool, remat_policy: Any) -> Callable:
  """:func:`lean_value_and_grad` on a parameter pytree and optax state."""

  def value_and_lean_grad(params, opt_state, *args, **kwargs):
    inner = _introspect.find_state(opt_state)
    flat, treedef = jax.tree_util.tree_flatten(params)
    slot_of_leaf, slot_leaves = [], []
    for position, leaf in enumerate(flat):
      if _layout.is_float_leaf(leaf) and int(np.prod(leaf.shape)) > 0:
        slot_of_leaf.append(len(slot_leaves))
        slot_leaves.append(position)
      else:
        slot_of_leaf.append(None)
    num_slots = len(slot_leaves)
    sinks = _Sinks(int(inner.mu.shape[0]), inner.mu.dtype, num_slots)
    paths = [_layout.path_to_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]

    def call_loss(tree):
      out = loss_fn(tree, *args, **kwargs)
      return out if has_aux else (out, None)

    lean_slots, taken = frozenset(), {}
    if num_slots:
      lean_slots, taken, reasons = _plan_lean(
          call_loss, flat, treedef, slot_leaves, paths, compute_lean)
      if warn:
        _warn_fallback(reasons)
    # With no Dense taken over, chained taps would only hold every tapped
    # gradient until the end of the backward pass: add into a packed sink.
    sinks.chained = bool(lean_slots) or bool(taken)
    # A scanned leaf's layers (the scan's length); 1 for the others.
    sinks.layers = tuple(taken[s].layers if s in taken else 1
                         for s in range(num_slots))

    def lean_dense(slot, inputs, kernel, precision, chain, norm_sink):
      """A taken-over Dense: (outputs, control token, chain)."""
      return _lean_dense(sinks, slot, flat[slot_leaves[slot]].dtype,
                         precision, inputs, kernel, chain, norm_sink)

    def chained_tap(slot, value, chain, norm_sink):
      return _chained_tap(sinks, slot, value, chain, norm_sink)

    hooks = _lean_transforms.Hooks(
        dense=lean_dense if compute_lean else None, tap=chained_tap)

    def forward(packed_sink, norm_sink, slot_params):
      if not taken:
        return traced_forward(packed_sink, norm_sink, slot_params)
      # Layers inside nn.remat / nn.scan: trace, then evaluate the jaxpr
      # with their checkpoints and scans rebuilt (`_lean_transforms`).
      closed, shape = jax.make_jaxpr(traced_forward, return_shape=True)(
          packed_sink, norm_sink, slot_params)
      num_chain = len(jax.tree.leaves(packed_sink))
      first_param = num_chain + len(jax.tree.leaves(norm_sink))
      found: dict = {}
      outs, _ = _lean_transforms.evaluate(
          closed.jaxpr, closed.consts,
          jax.tree.leaves((packed_sink, norm_sink, slot_params)),
          {closed.jaxpr.invars[first_param + s]: s for s in taken},
          {s: norm_sink[s] for s in taken}, hooks, found,
          chain_vars=closed.jaxpr.invars[:num_chain])
      (loss, tokens, chain), aux = jax.tree.unflatten(
          jax.tree.structure(shape), outs)
      missing = [s for s in taken if s not in found]
      if missing:
        raise _path_changed([paths[slot_leaves[s]] for s in missing],
                            stacked=True)
      tokens = tuple(found.get(s, t) for s, t in enumerate(tokens))
      return (loss, tokens, chain), aux

    def traced_forward(packed_sink, norm_sink, slot_params):
      tree_leaves = list(flat)
      tokens = [None] * num_slots
      # Compute-lean: the chain (a tuple, see `linearize`) runs through the
      # taps, then through the Dense calls in execution order.
      chain = [packed_sink]
      for slot, position in enumerate(slot_leaves):
        if slot in lean_slots or slot in taken:
          # Taken over in their Dense call (inside nn.remat / nn.scan: by
          # `_lean_transforms`).
          tree_leaves[position] = slot_params[slot]
        elif sinks.chained:
          tree_leaves[position], tokens[slot], chain[0] = _chained_tap(
              sinks, slot, slot_params[slot], chain[0], norm_sink[slot])
        else:
          tree_leaves[position], tokens[slot] = _tap(
              sinks, slot, slot_params[slot], packed_sink, norm_sink[slot])
      slot_of_object = {id(tree_leaves[slot_leaves[s]]): s
                        for s in lean_slots}

      def dense(module, inputs, kernel, slot):
        outputs, tokens[slot], chain[0] = lean_dense(
            slot, inputs, jnp.asarray(kernel, inputs.dtype),
            module.precision, chain[0], norm_sink[slot])
        return outputs

      interceptor = _DenseInterceptor(slot_of_object, dense)
      with interceptor.installed():
        loss, aux = call_loss(treedef.unflatten(tree_leaves))
      missing = [s for s in lean_slots if tokens[s] is None]
      if missing:
        raise _path_changed([paths[slot_leaves[s]] for s in missing],
                            stacked=False)
      # The end of the chain gets a zero cotangent; the packed gradient is
      # then the cotangent of `packed_sink`: the chain plus the taps.
      return (loss, tuple(tokens), chain[0]), aux

    params_like = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf),
                                          jnp.result_type(leaf)), params)

    def linearize():
      packed_sink = jnp.zeros([sinks.capacity], sinks.packed_dtype)
      if sinks.chained:
        # (packed gradient or mu, nu or unused[, float32 salt of the
        # moments' stochastic rounding]): one structure for both kinds of
        # pass.
        packed_sink = ((packed_sink, jnp.zeros_like(packed_sink))
                       + sinks.salt_leaves())
      # One scalar per slot: its cotangent is the slot's squared norm, with
      # no scatter into a shared vector (which would put the slot's index
      # into, and so make distinct, every slot's kernel).
      norm_sink = tuple(jnp.zeros([], jnp.float32) if layers == 1 else
                        jnp.zeros([layers], jnp.float32)
                        for layers in sinks.layers)
      slot_params = tuple(flat[p] for p in slot_leaves)
      policy = _resolve_remat_policy(remat_policy, transformed=bool(taken))
      # `prevent_cse=False`: a straight-line step (BAdam, BREAD) lets XLA
      # merge the recomputation with the forward pass; only a backward pass
      # inside a loop recomputes.
      rematted = forward if policy is None else jax.checkpoint(
          forward, policy=policy, prevent_cse=False)
      (loss, _, _), vjp_fn, aux = jax.vjp(rematted, packed_sink, norm_sink,
                                       slot_params, has_aux=True)
      grads = LeanGradients(
          vjp_fn, loss, tuple(slot_of_leaf), sinks, params_like,
          tuple(sorted(slot_leaves[s] for s in lean_slots | set(taken)))
          if compute_lean else (), linearize)
      return loss, aux, grads

    loss, aux, grads = linearize()
    return ((loss, aux) if has_aux else loss), grads

  return value_and_lean_grad


def _resolve_remat_policy(remat_policy: Any, *, transformed: bool,
                          backend: Optional[str] = None) -> Optional[Callable]:
  """``lean_value_and_grad``'s ``remat_policy`` for ``backend`` (default:
  the one being traced for). ``"auto"``: none on CPU, whose compiler hoists
  the forward out of BlockLLM's backward loop anyway, and none where layers
  were taken over inside ``nn.remat`` / ``nn.scan`` (``transformed``): the
  user's checkpoints decide what their layers keep, and an outer policy
  there raised XLA:CPU's temporaries (scanned + remat LLaMA: 793 against
  651 KB)."""
  if not isinstance(remat_policy, str):
    return remat_policy
  if transformed or (backend or jax.default_backend()) == "cpu":
    return None
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _path_changed(missing_paths, stacked: bool) -> RuntimeError:
  """The error of a loss function that, traced again, did not reach the
  Dense calls (or scans) its planning trace found."""
  remedy = ("use `jax.value_and_grad` for this model" if stacked else
            "pass `compute_lean=False` (taps only), or use "
            "`jax.value_and_grad`")
  return RuntimeError(
      "lean_value_and_grad: the loss function took a different path when "
      "traced again than when its layers were planned (it traces the loss "
      "twice with the same arguments); these leaves were not reached: "
      f"{', '.join(missing_paths)}. Make the loss trace the same way each "
      "time (no Python-side state or randomness that changes between "
      f"calls), or {remedy}.")


def _plan_lean(call_loss, flat, treedef, slot_leaves, paths,
               compute_lean: bool):
  """Which leaves only ever feed one plain ``nn.Dense`` call (by tracing),
  and which are taken over inside checkpoints and scans.

  Returns ``(lean_slots, taken, reasons)``: slots taken over in their Dense
  call; slot -> ``_lean_transforms.Plan`` of those taken over inside
  ``jax.checkpoint`` / ``lax.scan`` (``nn.remat`` / ``nn.scan``); and
  ``reasons``, which maps the path of every Dense kernel (or, for a call
  inside a transformed function, the Dense module) that cannot be taken
  over to why. Without ``compute_lean`` (tier B) no Dense is taken over:
  only scans are, their layers tapped (a tap outside would get the
  stacked gradient).
  """
  num_slots = len(slot_leaves)
  recorded, passed_over = {}, {}

  def probe(slot_params, kernels):
    tree_leaves = list(flat)
    for slot, position in enumerate(slot_leaves):
      tree_leaves[position] = slot_params[slot]
    slot_of_object = {id(slot_params[s]): s for s in range(num_slots)}

    def dense(module, inputs, kernel, slot):
      del kernel  # the copy below stands in for it
      copy = jnp.asarray(kernels[slot], inputs.dtype)
      return _contract(inputs, copy, module.precision)

    interceptor = _DenseInterceptor(slot_of_object, dense)
    with (interceptor.installed() if compute_lean
          else contextlib.nullcontext()):
      loss, _ = call_loss(treedef.unflatten(tree_leaves))
    recorded.update(interceptor.calls)
    passed_over.update(interceptor.passed_over)
    return loss

  slot_params = tuple(flat[p] for p in slot_leaves)
  closed = jax.make_jaxpr(probe)(slot_params, slot_params)
  jaxpr = closed.jaxpr
  used = set()
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
  used.update(v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal))
  lean, reasons = set(), dict(passed_over)
  for slot, count in recorded.items():
    path = paths[slot_leaves[slot]]
    if count > 1:
      reasons[path] = f"used by {count} Dense calls"
    elif jaxpr.invars[slot] in used:
      reasons[path] = "also used outside its Dense call"
    else:
      lean.add(slot)
  taken = _lean_transforms.plan(
      jaxpr, {jaxpr.invars[s]: s for s in range(num_slots) if s not in lean},
      take_dense=compute_lean)
  # Dense modules inside nn.remat / nn.scan were passed over by the
  # interceptor; those whose kernel is taken over there are no fallback.
  taken_paths = {paths[slot_leaves[s]] for s in taken}
  for where in list(reasons):
    if any(p == f"{where}/kernel" or p.endswith(f"/{where}/kernel")
           for p in taken_paths):
      del reasons[where]
  return frozenset(lean), taken, reasons
