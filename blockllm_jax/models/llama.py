"""A compact Flax LLaMA: RMSNorm, rotary embeddings, SwiGLU, grouped-query
attention, causal mask, tied or untied output head.

Parameter names follow Hugging Face's ``LlamaForCausalLM``
(``model/layers_0/self_attn/q_proj/kernel``, ``lm_head/kernel``, ...), with
Flax's ``(in, out)`` kernel layout.

References:
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models",
  2023. https://arxiv.org/abs/2302.13971
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class LlamaSettings:
  """The architecture fields of a ``transformers.LlamaConfig``."""

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

  @classmethod
  def from_config(cls, config: Any) -> "LlamaSettings":
    """Reads the fields from a ``transformers.LlamaConfig`` (or any object)."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: getattr(config, n) for n in names if getattr(config, n, None) is not None}
    return cls(**values)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


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


def rotary(x, positions, theta):
  """Applies rotary embeddings (HF's rotate-half convention) to [B,T,H,D]."""
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions[..., None].astype(jnp.float32) * inv_freq
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  half = head_dim // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _dense(features, name, dtype, param_dtype):
  """A bias-free linear layer as in LLaMA, initialised N(0, 0.02)."""
  return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(0.02), name=name)


class _LlamaPart(nn.Module):
  """Fields shared by the LLaMA sub-modules."""

  settings: LlamaSettings
  dtype: Any
  param_dtype: Any


class Attention(_LlamaPart):

  @nn.compact
  def __call__(self, x, positions):
    s = self.settings
    dense = lambda features, name: _dense(features, name, self.dtype,
                                          self.param_dtype)
    batch, seq, _ = x.shape
    q = dense(s.num_attention_heads * s.head_dim, "q_proj")(x)
    k = dense(s.num_key_value_heads * s.head_dim, "k_proj")(x)
    v = dense(s.num_key_value_heads * s.head_dim, "v_proj")(x)
    q = q.reshape(batch, seq, s.num_attention_heads, s.head_dim)
    k = k.reshape(batch, seq, s.num_key_value_heads, s.head_dim)
    v = v.reshape(batch, seq, s.num_key_value_heads, s.head_dim)
    q, k = rotary(q, positions, s.rope_theta), rotary(k, positions, s.rope_theta)
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
    dense = lambda features, name: _dense(features, name, self.dtype,
                                          self.param_dtype)
    gate = dense(s.intermediate_size, "gate_proj")(x)
    up = dense(s.intermediate_size, "up_proj")(x)
    return dense(s.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(_LlamaPart):

  @nn.compact
  def __call__(self, x, positions):
    s = self.settings
    h = RMSNorm(s.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
    x = x + Attention(s, self.dtype, self.param_dtype, name="self_attn")(h, positions)
    h = RMSNorm(s.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(x)
    return x + MLP(s, self.dtype, self.param_dtype, name="mlp")(h)


class LlamaModel(_LlamaPart):

  @nn.compact
  def __call__(self, tokens, positions):
    s = self.settings
    embed = nn.Embed(s.vocab_size, s.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(0.02),
                     name="embed_tokens")
    x = embed(tokens)
    for i in range(s.num_hidden_layers):
      x = DecoderLayer(s, self.dtype, self.param_dtype, name=f"layers_{i}")(x, positions)
    return RMSNorm(s.rms_norm_eps, self.param_dtype, name="norm")(x), embed


class LlamaForCausalLM(nn.Module):
  """LLaMA language model returning float32 logits ``[batch, seq, vocab]``.

  Attributes:
    settings: architecture (see :meth:`LlamaSettings.from_config`).
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
      logits = _dense(self.settings.vocab_size, "lm_head", self.dtype,
                      self.param_dtype)(hidden)
    return logits.astype(jnp.float32)


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
