"""A compact Flax LLaMA: RMSNorm, rotary embeddings (with Llama 3.1 frequency
scaling), SwiGLU, grouped-query attention, causal mask, tied or untied output
head, optional LoRA adapters.

Parameter names follow Hugging Face's ``LlamaForCausalLM``
(``model/layers_0/self_attn/q_proj/kernel``, ``lm_head/kernel``, ...), with
Flax's ``(in, out)`` kernel layout, so checkpoints convert by renaming and
transposing (see :func:`blockllm_jax.models.load_hf_checkpoint`).

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
  2023. https://arxiv.org/abs/2302.13971
  Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021.
  https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# The projections PEFT targets for LLaMA when asked for "all-linear" layers.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                "down_proj")


# What a rematerialised decoder layer may keep for its backward pass (names
# of `jax.checkpoint_policies`).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1/3.2 rotary frequency scaling (HF ``rope_type: "llama3"``).

  Defaults are those of Llama 3.1 8B.
  """

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaSettings:
  """The architecture fields of a ``transformers.LlamaConfig``, plus LoRA.

  ``head_dim=None`` means ``hidden_size // num_attention_heads`` and is
  resolved at construction, so ``settings.head_dim`` is always an int (give
  ``head_dim=None`` again when ``dataclasses.replace`` changes the width).
  ``rope_scaling`` is None or a :class:`Llama3RopeScaling` (an HF-style dict
  is converted). With ``lora_rank > 0`` every projection named in
  ``lora_targets`` (see ``LORA_TARGETS``; ``"lm_head"`` is also allowed when
  untied) gets adapters ``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)``
  next to its kernel and computes ``x @ W + (lora_alpha / r) * x @ A @ B``.
  The LoRA fields are not part of HF configs, nor are the layout fields:
  ``scan_layers=True`` runs the decoder layers under ``nn.scan`` with their
  parameters stacked on a leading axis (``model/layers/...``, shape
  ``(num_hidden_layers, ...)``: compile time flat in depth; train it with
  ``layer_axis=0`` on the optimizers); ``remat=True`` rematerialises each
  decoder layer in the backward pass, saving what ``remat_policy`` names
  (a ``jax.checkpoint_policies`` name: ``"nothing_saveable"``, the
  default, recomputes everything; ``"dots_saveable"`` /
  ``"dots_with_no_batch_dims_saveable"`` keep matmul outputs).
  :func:`stack_layers` / :func:`unstack_layers` convert parameters between
  the two layouts.
  """

  vocab_size: int = 260
  hidden_size: int = 64
  intermediate_size: int = 176
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 512
  head_dim: Optional[int] = None
  rope_scaling: Optional[Llama3RopeScaling] = None
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = LORA_TARGETS
  scan_layers: bool = False
  remat: bool = False
  remat_policy: str = "nothing_saveable"

  def __post_init__(self):
    # Frozen: fields are normalised through object.__setattr__.
    if self.head_dim is None:
      object.__setattr__(self, "head_dim",
                         self.hidden_size // self.num_attention_heads)
    if isinstance(self.rope_scaling, collections.abc.Mapping):
      from blockllm_jax.models._hf import rope_scaling_from_hf
      object.__setattr__(self, "rope_scaling",
                         rope_scaling_from_hf(dict(self.rope_scaling),
                                              self.max_position_embeddings))
    # A list would make the settings unhashable (Flax needs them hashable).
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be a multiple"
          f" of num_key_value_heads ({self.num_key_value_heads}).")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings, got "
                       f"{self.head_dim}.")
    if not (self.rope_scaling is None or
            isinstance(self.rope_scaling, Llama3RopeScaling)):
      raise ValueError(f"rope_scaling must be None or Llama3RopeScaling, got "
                       f"{self.rope_scaling!r}.")
    if self.lora_rank < 0:
      raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got "
                       f"{self.remat_policy!r}.")
    allowed = LORA_TARGETS + (() if self.tie_word_embeddings else ("lm_head",))
    unknown = [t for t in self.lora_targets if t not in allowed]
    if unknown:
      raise ValueError(f"lora_targets {unknown} are not LoRA-capable layers; "
                       f"accepted: {allowed}.")

  @classmethod
  def from_config(cls, config: Any, **overrides) -> "LlamaSettings":
    """Settings of a ``transformers.LlamaConfig``, a ``config.json`` dict or
    any object with LlamaConfig attributes; ``overrides`` set other fields
    (e.g. ``lora_rank``).

    Raises:
      ValueError: for configs this model cannot reproduce (biases, other
        rope types, non-llama ``model_type``, ...), naming the field.
    """
    from blockllm_jax.models._hf import settings_from_hf_config
    return settings_from_hf_config(config, **overrides)

  def to_config_dict(self, dtype: Any = None) -> dict:
    """The ``config.json`` dict of an HF ``LlamaForCausalLM`` (LoRA dropped).

    Args:
      dtype: the weights' dtype, recorded as ``torch_dtype``/``dtype``.
    """
    from blockllm_jax.models._hf import hf_config_dict
    return hf_config_dict(self, dtype)


def rope_frequencies(settings: LlamaSettings) -> np.ndarray:
  """Rotary inverse frequencies, float32 ``[head_dim // 2]``.

  Follows ``transformers.modeling_rope_utils`` op for op in float32
  (``compute_default_rope_parameters`` and ``_compute_llama3_parameters``);
  results agree to the bit or within one float32 ulp.
  """
  dim = settings.head_dim
  f32 = np.float32
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim)
  # float32 pow correctly rounded (via float64): torch's CPU pow agrees with
  # it to the bit in nearly every case, numpy's float32 pow does not.
  powers = np.power(np.float64(settings.rope_theta), exponents.astype(np.float64))
  inv_freq = f32(1.0) / powers.astype(f32)
  scaling = settings.rope_scaling
  if scaling is None:
    return inv_freq
  factor = f32(scaling.factor)
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  context = scaling.original_max_position_embeddings
  low_freq_wavelen, high_freq_wavelen = f32(context / low), f32(context / high)
  wavelen = f32(2 * math.pi) / inv_freq
  # Long wavelengths are slowed by `factor`, short ones kept, and the band in
  # between interpolated smoothly.
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (f32(context) / wavelen - f32(low)) / f32(high - low)
  smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(f32)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (x.shape[-1],),
                        self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return weight * normed.astype(x.dtype)


def rotary(x, positions, inv_freq):
  """Applies rotary embeddings (HF's rotate-half convention) to [B,T,H,D].

  Args:
    x: queries or keys ``[batch, seq, heads, head_dim]``.
    positions: int ``[batch, seq]``.
    inv_freq: ``[head_dim // 2]`` (see :func:`rope_frequencies`).
  """
  head_dim = x.shape[-1]
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = head_dim // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


# LLaMA's linear layers are bias-free and initialised N(0, 0.02).
_KERNEL_INIT = nn.initializers.normal(0.02)
# PEFT's lora_A init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
LORA_A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _contract(x, kernel):
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


class LoRADense(nn.Module):
  """Bias-free linear layer with a low-rank adapter:
  ``x @ kernel + (alpha / rank) * (x @ lora_a) @ lora_b``.

  ``lora_b`` starts at zero, so a fresh adapter leaves the output unchanged.
  """

  features: int
  rank: int
  alpha: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", _KERNEL_INIT, (fan_in, self.features),
                        self.param_dtype)
    lora_a = self.param("lora_a", LORA_A_INIT, (fan_in, self.rank),
                        self.param_dtype)
    lora_b = self.param("lora_b", nn.initializers.zeros,
                        (self.rank, self.features), self.param_dtype)
    x, kernel, lora_a, lora_b = nn.dtypes.promote_dtype(
        x, kernel, lora_a, lora_b, dtype=self.dtype)
    delta = _contract(_contract(x, lora_a), lora_b)
    return _contract(x, kernel) + delta * jnp.asarray(self.alpha / self.rank, delta.dtype)


def _dense(settings, features, name, dtype, param_dtype):
  """A LLaMA linear layer, with a LoRA adapter where ``settings`` ask."""
  if settings.lora_rank and name in settings.lora_targets:
    return LoRADense(features, settings.lora_rank, settings.lora_alpha, dtype,
                     param_dtype, name=name)
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_KERNEL_INIT, name=name)


class _LlamaPart(nn.Module):
  """Fields shared by the LLaMA sub-modules."""

  settings: LlamaSettings
  dtype: Any
  param_dtype: Any


class Attention(_LlamaPart):

  @nn.compact
  def __call__(self, x, positions):
    s = self.settings
    dense = lambda features, name: _dense(s, features, name, self.dtype,
                                          self.param_dtype)
    batch, seq, _ = x.shape
    q = dense(s.num_attention_heads * s.head_dim, "q_proj")(x)
    k = dense(s.num_key_value_heads * s.head_dim, "k_proj")(x)
    v = dense(s.num_key_value_heads * s.head_dim, "v_proj")(x)
    q = q.reshape(batch, seq, s.num_attention_heads, s.head_dim)
    k = k.reshape(batch, seq, s.num_key_value_heads, s.head_dim)
    v = v.reshape(batch, seq, s.num_key_value_heads, s.head_dim)
    inv_freq = rope_frequencies(s)
    q, k = rotary(q, positions, inv_freq), rotary(k, positions, inv_freq)
    groups = s.num_attention_heads // s.num_key_value_heads
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(s.head_dim))
    causal = jnp.tril(jnp.ones((seq, seq), bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, -1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, -1)
    return dense(s.hidden_size, "o_proj")(out)


class MLP(_LlamaPart):

  @nn.compact
  def __call__(self, x):
    s = self.settings
    dense = lambda features, name: _dense(s, features, name, self.dtype,
                                          self.param_dtype)
    gate = dense(s.intermediate_size, "gate_proj")(x)
    up = dense(s.intermediate_size, "up_proj")(x)
    return dense(s.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(_LlamaPart):
  """One decoder layer; under ``nn.scan`` it returns ``(x, None)``."""

  scanned: bool = False

  @nn.compact
  def __call__(self, x, positions):
    s = self.settings
    h = RMSNorm(s.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
    x = x + Attention(s, self.dtype, self.param_dtype, name="self_attn")(h, positions)
    h = RMSNorm(s.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
    x = x + MLP(s, self.dtype, self.param_dtype, name="mlp")(h)
    return (x, None) if self.scanned else x


def _layer_class(s: LlamaSettings):
  """DecoderLayer, rematerialised and/or scanned as ``s`` asks."""
  layer = DecoderLayer
  if s.remat:
    # Under scan, CSE cannot merge the recomputation into the forward pass
    # anyway; outside it, prevent_cse keeps the rematerialisation.
    layer = nn.remat(layer, prevent_cse=not s.scan_layers,
                     policy=getattr(jax.checkpoint_policies, s.remat_policy))
  if s.scan_layers:
    layer = nn.scan(layer, variable_axes={"params": 0},
                    split_rngs={"params": True}, in_axes=(nn.broadcast,),
                    length=s.num_hidden_layers)
  return layer


class LlamaModel(_LlamaPart):

  @nn.compact
  def __call__(self, tokens, positions):
    s = self.settings
    embed = nn.Embed(s.vocab_size, s.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02),
                     name="embed_tokens")
    x = embed(tokens)
    layer = _layer_class(s)
    if s.scan_layers:
      x, _ = layer(s, self.dtype, self.param_dtype, scanned=True,
                   name="layers")(x, positions)
    else:
      for i in range(s.num_hidden_layers):
        x = layer(s, self.dtype, self.param_dtype, name=f"layers_{i}")(x, positions)
    return RMSNorm(s.rms_norm_eps, self.param_dtype, name="norm")(x), embed


class LlamaForCausalLM(nn.Module):
  """LLaMA language model returning float32 logits ``[batch, seq, vocab]``.

  Attributes:
    settings: architecture (see :meth:`LlamaSettings.from_config` and
      :func:`~blockllm_jax.models.load_hf_checkpoint`), LoRA included.
    dtype: activation dtype (e.g. ``jnp.bfloat16``).
    param_dtype: parameter dtype.

  Example:
    >>> model = LlamaForCausalLM(LlamaSettings())
    >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
    >>> logits = model.apply({'params': params}, jnp.zeros((1, 8), jnp.int32))
  """

  settings: LlamaSettings
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, positions: Optional[jax.Array] = None):
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, embed = LlamaModel(self.settings, self.dtype, self.param_dtype,
                               name="model")(tokens, positions)
    if self.settings.tie_word_embeddings:
      logits = embed.attend(hidden)
    else:
      logits = _dense(self.settings, self.settings.vocab_size, "lm_head",
                      self.dtype, self.param_dtype)(hidden)
    return logits.astype(jnp.float32)


def stack_layers(params, num_layers: Optional[int] = None):
  """Unrolled LLaMA parameters (``model/layers_<i>/...``) in the scanned
  layout (``model/layers/...``, layers stacked on a leading axis), for
  ``LlamaSettings(scan_layers=True)``.

  Raises:
    ValueError: when the layers are missing or do not share one structure.
  """
  model = dict(params["model"])
  count = num_layers if num_layers is not None else sum(
      1 for k in model if k.startswith("layers_"))
  try:
    layers = [model.pop(f"layers_{i}") for i in range(count)]
  except KeyError as err:
    raise ValueError(f"params lack the decoder layer {err}.") from None
  if not layers:
    raise ValueError("params have no `model/layers_<i>` to stack.")
  structures = {jax.tree_util.tree_structure(layer) for layer in layers}
  if len(structures) != 1:
    raise ValueError("the decoder layers do not share one structure.")
  model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "model": model}


def unstack_layers(params):
  """Scanned LLaMA parameters (``model/layers/...``, stacked) in the
  unrolled layout (``model/layers_<i>/...``); inverse of
  :func:`stack_layers`."""
  model = dict(params["model"])
  stacked = model.pop("layers")
  count = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(count):
    model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, "model": model}


def causal_lm_loss(logits, tokens, loss_mask=None):
  """Mean next-token cross-entropy; ``loss_mask[b, t]`` weights target t.

  Args:
    logits: float[B, T, V] predictions for positions 0..T-1.
    tokens: int[B, T] inputs; targets are ``tokens[:, 1:]``.
    loss_mask: optional float/bool[B, T] over targets (index t weighs the
      prediction of ``tokens[:, t]``); default all ones.
  """
  targets = tokens[:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
  weights = jnp.ones_like(losses) if loss_mask is None else loss_mask[:, 1:].astype(losses.dtype)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
