"""BREAD: BAdam plus a landscape correction of the inactive blocks.

In the same step as the active block's Adam update, the inactive blocks
(all of them, or with ``scope="partial"`` only those between the active
block and the output) are corrected with the gradients the backward pass
computed anyway:

- ``"sgd"``: ``-lr * correction_scale * g``, no state;
- ``"sign_sgd"``: ``-lr * correction_scale * sign(g)``, no state;
- ``"lora"``: the LoRA adapters (``lora_a`` / ``lora_b``, see
  :func:`blockllm_jax.models.add_lora`) of those blocks are trained with
  Adam at ``lr * correction_scale``; their moments share the compact
  buffers with the active block and restart at every switch.

The state is exactly BAdam's (:class:`ScaleByBAdamState`): SGD corrections
need none, and the adapters' moments are part of the block period.

References:
  "Accelerating Block Coordinate Descent for LLM Finetuning via Landscape
  Correction" (BREAD), 2024. https://openreview.net/forum?id=zs6bRl05g8
  Luo, Yu and Li, "BAdam", 2024. https://arxiv.org/abs/2404.02827
"""

from __future__ import annotations

from typing import Any, Optional

import optax

from blockllm_jax import _badam
from blockllm_jax import _blocks
from blockllm_jax import _engine
from blockllm_jax import _layout


def scale_by_bread(
    correction: str = "sgd",
    correction_scale: float = 1.0,
    scope: str = "all",
    *,
    switch_every: int = 100,
    order: str = "random",
    blocks: Optional[_blocks.BlockRule] = None,
    layers_per_block: Optional[int] = None,
    include_embedding: bool = False,
    include_head: bool = False,
    always_active: _blocks.LeafMask = None,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    moment_dtype: Any = "float32",
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """BAdam's directions plus a correction of the inactive blocks (BREAD).

  Per step, the active block (and the always-active leaves) get Adam
  directions exactly as in :func:`blockllm_jax.scale_by_badam`. The blocks
  in scope get, in the same step:

  - ``correction="sgd"``: ``correction_scale * g``;
  - ``correction="sign_sgd"``: ``correction_scale * sign(g)``;
  - ``correction="lora"``: the Adam direction of their LoRA adapters times
    ``correction_scale``. The adapters then belong to no block (the
    kernels they adapt stay in theirs) and are trained only while their
    block is inactive and in scope, with moments that restart at every
    switch. Adapters outside every block (e.g. on ``lm_head`` when the
    head is no block) count as the output end: always in scope.

  The learning rate multiplies everything afterwards (``optax.chain`` with
  ``optax.scale_by_learning_rate``, as :func:`blockllm_jax.bread` does), so
  an SGD correction moves a parameter by ``lr * correction_scale * g``.
  Leaves in no block are never corrected, and weight decay applies to the
  Adam-trained leaves only.

  Args:
    correction: ``"sgd"``, ``"sign_sgd"`` or ``"lora"``.
    correction_scale: multiplier of the learning rate for the correction
      (>= 0); plain SGD usually wants a larger step than Adam.
    scope: ``"all"`` inactive blocks, or ``"partial"``: only the blocks after
      the active one in ascending order (between it and the output).
    switch_every, order, blocks, layers_per_block, include_embedding,
      include_head, always_active, seed, b1, b2, eps, eps_root,
      weight_decay, moment_dtype, param_sharding, layer_axis: see
      :func:`blockllm_jax.scale_by_badam`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` accepts (and
    does not need) ``value=loss``. ``init`` raises a ``ValueError`` for
    ``correction="lora"`` on a tree without adapters.

  Example:
    >>> tx = optax.chain(
    ...     blockllm_jax.scale_by_bread('sign_sgd', 0.1, switch_every=50),
    ...     optax.scale_by_learning_rate(1e-5))

  References:
    BREAD: https://openreview.net/forum?id=zs6bRl05g8
    BAdam: Luo, Yu and Li, 2024. https://arxiv.org/abs/2404.02827
  """
  return _badam._scale_by_block_adam(
      switch_every=switch_every, order=order, blocks=blocks,
      layers_per_block=layers_per_block, include_embedding=include_embedding,
      include_head=include_head, always_active=always_active, seed=seed,
      b1=b1, b2=b2, eps=eps, eps_root=eps_root, weight_decay=weight_decay,
      moment_dtype=moment_dtype, correction=correction,
      correction_scale=correction_scale, scope=scope,
      param_sharding=param_sharding, layer_axis=layer_axis)


def bread(
    learning_rate: optax.ScalarOrSchedule,
    *,
    correction: str = "sgd",
    correction_scale: float = 1.0,
    scope: str = "all",
    switch_every: int = 100,
    order: str = "random",
    blocks: Optional[_blocks.BlockRule] = None,
    layers_per_block: Optional[int] = None,
    include_embedding: bool = False,
    include_head: bool = False,
    always_active: _blocks.LeafMask = None,
    seed: int = 0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    moment_dtype: Any = "float32",
    stochastic_rounding: bool = True,
    param_sharding: Any = None,
    layer_axis: _layout.LayerAxis = None,
) -> optax.GradientTransformationExtraArgs:
  """BREAD optimizer: :func:`scale_by_bread`, the learning rate, rounding.

  bf16 parameters: the original code adds the SGD correction straight into
  bf16 weights, where nearly every update is smaller than half a bf16 ulp
  and rounds away. Here the update arrives in float32 and
  :func:`blockllm_jax.stochastic_rounding` rounds ``p + update``
  stochastically, so corrections move bf16 weights by the right amount on
  average. Memory cost: a ``uint32[2]`` key (an fp32 master copy of every
  correctable bf16 weight would cost 4 bytes per coordinate, twice the
  bf16 model).

  Args:
    learning_rate: a float (>= 0) or an Optax schedule; the SGD correction
      uses ``learning_rate * correction_scale``.
    correction, correction_scale, scope, switch_every, order, blocks,
      layers_per_block, include_embedding, include_head, always_active,
      seed, b1, b2, eps, eps_root, weight_decay, moment_dtype,
      param_sharding, layer_axis: see :func:`scale_by_bread` and
      :func:`blockllm_jax.scale_by_badam`.
    stochastic_rounding: end with :func:`blockllm_jax.stochastic_rounding`
      (no effect on float32 parameters).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Example:
    >>> tx = blockllm_jax.bread(1e-5, correction='sgd', correction_scale=5.0,
    ...                         switch_every=100, scope='partial')
    >>> opt_state = tx.init(params)

  References:
    BREAD: https://openreview.net/forum?id=zs6bRl05g8
    BAdam: Luo, Yu and Li, 2024. https://arxiv.org/abs/2404.02827
  """
  return _engine.with_learning_rate(
      scale_by_bread(
          correction, correction_scale, scope, switch_every=switch_every,
          order=order, blocks=blocks, layers_per_block=layers_per_block,
          include_embedding=include_embedding, include_head=include_head,
          always_active=always_active, seed=seed, b1=b1, b2=b2, eps=eps,
          eps_root=eps_root, weight_decay=weight_decay,
          moment_dtype=moment_dtype, param_sharding=param_sharding,
          layer_axis=layer_axis),
      learning_rate, stochastic_rounding, seed)
