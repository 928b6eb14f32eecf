"""Tiny models shared by the tests: an MLP and a small causal transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def mlp_params(key, widths, dtype=jnp.float32):
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {
        "kernel": (jax.random.normal(sub, (fan_in, fan_out)) /
                   np.sqrt(fan_in)).astype(dtype),
        "bias": jnp.zeros(fan_out, dtype),
    }
  return params


def mlp_loss(params, x, y):
  h = x
  n = len(params)
  for i in range(n):
    layer = params[f"layer{i}"]
    h = h @ layer["kernel"] + layer["bias"]
    if i < n - 1:
      h = jnp.tanh(h)
  return jnp.mean((h.astype(jnp.float32) - y) ** 2)


def mlp_problem(seed=0, widths=(8, 16, 16, 16, 4), batch=32, dtype=jnp.float32):
  key = jax.random.PRNGKey(seed)
  kp, kx, ky = jax.random.split(key, 3)
  params = mlp_params(kp, widths, dtype)
  x = jax.random.normal(kx, (batch, widths[0])).astype(dtype)
  y = jax.random.normal(ky, (batch, widths[-1]))
  return params, lambda p: mlp_loss(p, x, y)


def transformer_params(key, width=64, layers=2, vocab=128):
  keys = iter(jax.random.split(key, 8 * layers + 2))
  normal = lambda shape: jax.random.normal(next(keys), shape) * 0.02
  params = {"embed": normal((vocab, width)), "lm_head": normal((width, vocab))}
  for i in range(layers):
    params[f"block{i}"] = {
        "q": normal((width, width)), "k": normal((width, width)),
        "v": normal((width, width)), "o": normal((width, width)),
        "up": normal((width, 4 * width)), "down": normal((4 * width, width)),
        "norm1": jnp.ones(width), "norm2": jnp.ones(width),
    }
  return params


def _rms_norm(x, gain):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * gain


def transformer_loss(params, tokens):
  """Next-token cross-entropy of a pre-norm causal transformer."""
  seq = tokens.shape[1] - 1
  width = params["embed"].shape[1]
  x = params["embed"][tokens[:, :-1]]
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  for i in range(sum(k.startswith("block") for k in params)):
    block = params[f"block{i}"]
    h = _rms_norm(x, block["norm1"])
    q, k, v = h @ block["q"], h @ block["k"], h @ block["v"]
    scores = jnp.where(causal, q @ k.transpose(0, 2, 1) / np.sqrt(width), -1e9)
    x = x + jax.nn.softmax(scores) @ v @ block["o"]
    h = _rms_norm(x, block["norm2"])
    x = x + jax.nn.gelu(h @ block["up"]) @ block["down"]
  logits = x @ params["lm_head"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def train_step_fn(tx, loss_fn):
  """A train step ``(params, opt_state) -> (params, opt_state, loss)``."""

  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return step
