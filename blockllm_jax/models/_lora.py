"""LoRA adapters for :class:`~blockllm_jax.models.LlamaForCausalLM`: add,
merge, and select them for an optimizer.

With ``LlamaSettings(lora_rank=r)`` each targeted projection holds ``kernel``
``(in, out)``, ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)`` and computes
``x @ kernel + (lora_alpha / r) * (x @ lora_a) @ lora_b``, as PEFT does.

Example:
  >>> settings, params = load_hf_checkpoint(path, lora_rank=8, rng=key)
  >>> tx = optax.multi_transform({True: optax.adam(1e-4),
  ...                             False: optax.set_to_zero()},
  ...                            lora_mask(params))
  >>> ...  # train
  >>> save_hf_checkpoint(out, settings, params)  # merges the adapters

References:
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
from flax import traverse_util

from blockllm_jax.models.llama import LORA_A_INIT
from blockllm_jax.models.llama import LORA_TARGETS
from blockllm_jax.models.llama import LlamaSettings
from blockllm_jax.models.llama import stack_layers
from blockllm_jax.models.llama import unstack_layers

_ADAPTERS = ("lora_a", "lora_b")


def _key_name(entry: Any) -> str:
  """The name in one step of a JAX key path (or a plain string)."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def is_lora_path(path: Any) -> bool:
  """Whether a parameter path names a LoRA adapter (``lora_a``/``lora_b``).

  Args:
    path: a JAX key path (from ``jax.tree_util.tree_map_with_path``), a tuple
      of names (from ``flax.traverse_util.flatten_dict``) or a ``"a/b/c"``
      string.
  """
  if isinstance(path, str):
    path = path.split("/")
  return bool(path) and _key_name(path[-1]) in _ADAPTERS


def lora_mask(params) -> Any:
  """A pytree of bools shaped like ``params``, True exactly at the adapters.

  Use it to train only the adapters, e.g.
  ``optax.multi_transform({True: optax.adam(lr), False: optax.set_to_zero()},
  lora_mask(params))``. (``optax.masked(tx, mask)`` alone passes the
  unmasked gradients through unchanged, so pair it with ``set_to_zero``.)
  """
  return jax.tree_util.tree_map_with_path(lambda p, _: is_lora_path(p), params)


def add_lora(settings: LlamaSettings, params, rank: int, rng: jax.Array, *,
             alpha: float = 16.0, targets: Iterable[str] = LORA_TARGETS):
  """Wraps the targeted kernels of ``params`` with fresh adapters.

  ``lora_a`` is drawn as PEFT does (``U(-1/sqrt(in), 1/sqrt(in))``) and
  ``lora_b`` is zero, so the model's outputs are unchanged. Adapters take the
  dtype of their kernel.

  Args:
    settings: settings of ``params``, without LoRA.
    params: the model's parameters.
    rank: adapter rank r > 0.
    rng: PRNG key for ``lora_a``.
    alpha: scale numerator; the adapter output is multiplied by alpha / r.
    targets: projection names (see ``LORA_TARGETS``).

  Returns:
    ``(settings with lora_rank=rank, params with adapters)``.
  """
  if settings.lora_rank:
    raise ValueError(f"settings already have LoRA adapters (lora_rank="
                     f"{settings.lora_rank}); merge_lora first.")
  if rank <= 0:
    raise ValueError(f"rank must be positive, got {rank}.")
  if settings.scan_layers:  # adapters per layer, then stacked like the rest
    settings, params = add_lora(
        dataclasses.replace(settings, scan_layers=False),
        unstack_layers(params), rank, rng, alpha=alpha, targets=targets)
    return (dataclasses.replace(settings, scan_layers=True),
            stack_layers(params, settings.num_hidden_layers))
  settings = dataclasses.replace(settings, lora_rank=rank, lora_alpha=alpha,
                                 lora_targets=tuple(targets))
  flat = traverse_util.flatten_dict(params)
  kernels = [p for p in flat if p[-1] == "kernel" and len(p) >= 2 and
             p[-2] in settings.lora_targets]
  for path, key in zip(kernels, jax.random.split(rng, max(len(kernels), 1))):
    kernel = flat[path]
    fan_in, features = kernel.shape
    flat[path[:-1] + ("lora_a",)] = LORA_A_INIT(key, (fan_in, rank), kernel.dtype)
    flat[path[:-1] + ("lora_b",)] = jnp.zeros((rank, features), kernel.dtype)
  return settings, traverse_util.unflatten_dict(flat)


def merge_lora(settings: LlamaSettings, params):
  """Folds adapters into their kernels: ``kernel + (alpha / r) * A @ B``.

  The product is formed in float32 at full matmul precision and cast back to
  the kernel's dtype. Settings without LoRA are returned unchanged.

  Returns:
    ``(settings with lora_rank=0, params without adapters)``.
  """
  if not settings.lora_rank:
    return settings, params
  scale = settings.lora_alpha / settings.lora_rank
  flat = traverse_util.flatten_dict(params)
  for path in [p for p in flat if p[-1] == "lora_a"]:
    module = path[:-1]
    a = flat.pop(path).astype(jnp.float32)
    b = flat.pop(module + ("lora_b",)).astype(jnp.float32)
    kernel = flat[module + ("kernel",)]
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    flat[module + ("kernel",)] = (kernel.astype(jnp.float32) +
                                  scale * delta).astype(kernel.dtype)
  return (dataclasses.replace(settings, lora_rank=0),
          traverse_util.unflatten_dict(flat))
