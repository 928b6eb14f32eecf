"""Train a small Flax NNX language model with BlockLLM through nnx.Optimizer.

A LLaMA-style NNX model (pre-norm attention + MLP blocks built from
nnx.Linear) learns the English text shipped with Python, byte by byte, with
three train steps side by side: AdamW on nnx.value_and_grad, BlockLLM on
nnx.value_and_grad (plain), and BlockLLM on bl.lean_value_and_grad (lean:
no full gradient, no weight-gradient matmul for unselected layers). Prints
a table of loss, optimizer-state bytes, compiled step memory and step time.

  python examples/nnx_train.py
  python examples/nnx_train.py --steps 1000 --width 256 --sparsity 0.95
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import blockllm_jax as bl
from blockllm_jax import data


class Block(nnx.Module):
  """Pre-norm causal self-attention and a SwiGLU MLP, all nnx.Linear."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.norm1, self.norm2 = nnx.RMSNorm(width, rngs=rngs), nnx.RMSNorm(width, rngs=rngs)
    self.q, self.k, self.v, self.o = (linear(width, width) for _ in range(4))
    self.gate, self.up, self.down = linear(width, 4 * width), linear(width, 4 * width), \
        linear(4 * width, width)

  def __call__(self, x):
    b, t, d = x.shape
    h = self.norm1(x)
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    x = x + self.o(jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d))
    h = self.norm2(x)
    return x + self.down(jax.nn.silu(self.gate(h)) * self.up(h))


class TinyLM(nnx.Module):
  def __init__(self, vocab: int, width: int, depth: int, heads: int, seq_len: int,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, width)))
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
    self.norm = nnx.RMSNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, vocab, use_bias=False, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


def loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_step(method, model, optimizer):
  """A train step over (model, optimizer) state, compiled once."""
  graphdef, state = nnx.split((model, optimizer))
  lean_grad = bl.lean_value_and_grad(loss_fn)

  def step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    if method == "blockllm-lean":
      loss, grads = lean_grad(model, optimizer, tokens)
    else:
      loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
    optimizer.update(model, grads, value=loss)
    return nnx.state((model, optimizer)), loss

  return jax.jit(step, donate_argnums=0), state


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--patience", type=int, default=50)
  p.add_argument("--methods", nargs="+", default=["adamw", "blockllm", "blockllm-lean"],
                 choices=["adamw", "blockllm", "blockllm-lean"])
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)

  tokenizer = data.ByteTokenizer()
  corpus = np.asarray(tokenizer.encode(data.embedded_corpus()), np.int32)
  windows = lambda t: jnp.asarray(np.stack([corpus[s:s + args.seq_len + 1] for s in
                                            np.random.default_rng([0, t]).integers(
                                                0, corpus.size - args.seq_len - 1,
                                                args.batch_size)]))
  rows = []
  for method in args.methods:
    model = TinyLM(tokenizer.vocab_size, args.width, args.depth, args.heads,
                   args.seq_len, nnx.Rngs(0))
    tx = (optax.adamw(args.lr, weight_decay=0.0) if method == "adamw" else
          bl.blockllm(args.lr, sparsity=args.sparsity, patience=args.patience))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step, state = make_step(method, model, optimizer)
    compiled = step.lower(state, windows(0)).compile()
    memory = bl.CompiledMemory.of(compiled)
    state_bytes = bl.state_bytes(nnx.as_pure(optimizer.opt_state))
    losses, seconds = [], []
    for t in tqdm(range(args.steps), desc=method, disable=args.no_progress):
      begin = time.perf_counter()
      state, loss = compiled(state, windows(t))
      losses.append(float(loss))
      seconds.append(time.perf_counter() - begin)
    rows.append((method, f"{np.mean(losses[-20:]):.4f}", f"{state_bytes / 1e6:.2f} MB",
                 f"{memory.total / 1e6:.2f} MB",
                 f"{1e3 * np.median(seconds[len(seconds) // 5:]):.1f} ms"))
  header = ("method", "final loss", "state", "step memory", "median step")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  for j, row in enumerate([header] + rows):
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if j == 0:
      print("  ".join("-" * w for w in widths))
  return rows


if __name__ == "__main__":
  main()
