"""Fine-tune a small LLaMA with BlockLLM and compare with AdamW.

With no arguments: pretrains (or reuses from --cache-dir) a small LLaMA on
the English text shipped with Python, fine-tunes it on a generated
instruction task (reverse / sort / add / upper) with each optimizer, and
prints a table (final train loss, held-out exact match, optimizer-state
bytes, compiled train-step memory, median step time) and saves a loss plot.

  python examples/finetune_llama.py
  python examples/finetune_llama.py --optimizer blockllm --sparsity 0.95
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import argparse
import pickle
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import blockllm_jax as bl
from blockllm_jax import data
from blockllm_jax.models import LlamaForCausalLM, LlamaSettings, causal_lm_loss

OPTIMIZERS = ("blockllm", "adamw")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--optimizer", choices=OPTIMIZERS + ("all",), default="all")
  p.add_argument("--hidden-size", type=int, default=128)
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", type=int, default=2)
  p.add_argument("--pretrain-steps", type=int, default=400)
  p.add_argument("--pretrain-seq-len", type=int, default=64)
  p.add_argument("--steps", type=int, default=1000, help="fine-tuning steps per optimizer")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3, help="fine-tuning learning rate")
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--patience", type=int, default=20)
  p.add_argument("--train-examples", type=int, default=4000)
  p.add_argument("--eval-examples", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
  p.add_argument("--out-dir", type=Path, default=Path("runs/finetune"))
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def make_model(args):
  settings = LlamaSettings(
      vocab_size=data.ByteTokenizer.vocab_size, hidden_size=args.hidden_size,
      intermediate_size=int(args.hidden_size * 8 / 3 // 8 * 8),
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads)
  return LlamaForCausalLM(settings)


def pretrained_params(model, args):
  """Pretrains on the embedded corpus, or loads the cached result."""
  s = model.settings
  name = (f"llama_h{s.hidden_size}_l{s.num_hidden_layers}_a{s.num_attention_heads}"
          f"_kv{s.num_key_value_heads}_s{args.pretrain_steps}_seed{args.seed}.pkl")
  path = args.cache_dir / name
  if path.exists():
    with open(path, "rb") as f:
      return jax.tree.map(jnp.asarray, pickle.load(f))
  params = model.init(jax.random.PRNGKey(args.seed),
                      jnp.zeros((1, 8), jnp.int32))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0, 3e-3, 20, max(args.pretrain_steps, 21)))
  state = tx.init(params)

  @jax.jit
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: causal_lm_loss(model.apply({"params": p}, tokens), tokens))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  batches = data.language_model_batches(data.embedded_corpus(), args.pretrain_seq_len,
                                        args.batch_size, args.seed)
  bar = tqdm(range(args.pretrain_steps), desc="pretrain", disable=args.no_progress)
  for _ in bar:
    params, state, loss = step(params, state, jnp.asarray(next(batches)))
    bar.set_postfix(loss=f"{float(loss):.3f}")
  args.cache_dir.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:
    pickle.dump(jax.device_get(params), f)
  return params


def make_optimizer(name, args):
  if name == "adamw":
    return optax.adamw(args.lr, weight_decay=0.0)
  return bl.blockllm(args.lr, sparsity=args.sparsity, patience=args.patience)


def exact_match(model, params, examples, max_answer=10):
  """Greedy decoding after SEP; accuracy of answers matching exactly."""
  tok = data.ByteTokenizer()
  tokens = jnp.asarray(examples.tokens)
  positions = jnp.arange(tokens.shape[1])
  prompt_len = jnp.asarray(examples.prompt_length)
  # Blank everything after the prompt, then fill it one token at a time.
  tokens = jnp.where(positions[None] < prompt_len[:, None], tokens, tok.PAD)

  @jax.jit
  def decode(params, tokens):
    def body(j, tokens):
      logits = model.apply({"params": params}, tokens)
      at = jnp.minimum(prompt_len + j, tokens.shape[1] - 1)
      next_token = jnp.argmax(logits[jnp.arange(tokens.shape[0]), at - 1], -1)
      return tokens.at[jnp.arange(tokens.shape[0]), at].set(next_token)
    return jax.lax.fori_loop(0, max_answer + 1, body, tokens)

  out = np.asarray(decode(params, tokens))
  correct = 0
  for row, start, answer in zip(out, examples.prompt_length, examples.answers):
    generated = list(row[start:])
    end = generated.index(tok.EOS) if tok.EOS in generated else len(generated)
    correct += tok.decode(generated[:end]) == answer
  return correct / len(examples.answers)


def finetune(model, params, name, train, args):
  tx = make_optimizer(name, args)
  state = tx.init(params)

  def loss_fn(params, tokens, mask):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens, mask)

  def step(params, state, tokens, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  example = (params, state, jnp.asarray(train.tokens[:args.batch_size]),
             jnp.asarray(train.loss_mask[:args.batch_size]))
  memory = bl.compiled_memory(step, *example, donate_argnums=(0, 1))
  step = jax.jit(step, donate_argnums=(0, 1))
  params = jax.tree.map(jnp.copy, params)
  rng = np.random.default_rng(args.seed + 1)
  losses, times = [], []
  bar = tqdm(range(args.steps), desc=f"finetune {name}", disable=args.no_progress)
  for _ in bar:
    idx = rng.integers(0, len(train.answers), args.batch_size)
    start = time.perf_counter()
    params, state, loss = step(params, state, jnp.asarray(train.tokens[idx]),
                               jnp.asarray(train.loss_mask[idx]))
    loss = float(loss)  # waits for the step
    times.append(time.perf_counter() - start)
    losses.append(loss)
    bar.set_postfix(loss=f"{loss:.3f}")
  result = {
      "optimizer": name, "losses": losses,
      "final_loss": float(np.mean(losses[-10:])),
      "state_bytes": bl.state_bytes(state), "step_memory": memory.total,
      "median_step_ms": 1e3 * float(np.median(times[len(times) // 5:])),
  }
  if name != "adamw":
    result["reselections"] = int(bl.reselection_count(state))
  return params, result


def print_table(rows):
  header = ("optimizer", "final loss", "exact match", "state bytes",
            "step memory", "median step")
  lines = [header] + [(
      r["optimizer"], f"{r['final_loss']:.4f}", f"{100 * r['exact_match']:.1f}%",
      f"{r['state_bytes'] / 1e6:.3f} MB", f"{r['step_memory'] / 1e6:.2f} MB",
      f"{r['median_step_ms']:.1f} ms") for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  for j, line in enumerate(lines):
    print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    if j == 0:
      print("  ".join("-" * w for w in widths))


def plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for r in rows:
    ax.plot(r["losses"], label=r["optimizer"], alpha=0.8)
  ax.set_xlabel("fine-tuning step")
  ax.set_ylabel("answer-token loss")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  model = make_model(args)
  params = pretrained_params(model, args)
  examples = data.make_instruction_set(args.train_examples + args.eval_examples,
                                       seed=args.seed)
  split = lambda a, b: data.InstructionSet(
      examples.tokens[a:b], examples.loss_mask[a:b], examples.prompt_length[a:b],
      examples.answers[a:b])
  train = split(0, args.train_examples)
  held_out = split(args.train_examples, args.train_examples + args.eval_examples)
  baseline = exact_match(model, params, held_out)
  names = OPTIMIZERS if args.optimizer == "all" else (args.optimizer,)
  rows = []
  for name in names:
    tuned, result = finetune(model, params, name, train, args)
    result["exact_match"] = exact_match(model, tuned, held_out)
    rows.append(result)
  args.out_dir.mkdir(parents=True, exist_ok=True)
  plot(rows, args.out_dir / "finetune_loss.png")
  print(f"\nheld-out exact match before fine-tuning: {100 * baseline:.1f}%")
  print_table(rows)
  print(f"loss plot: {args.out_dir / 'finetune_loss.png'}")
  return {"baseline_exact_match": baseline, "results": rows}


if __name__ == "__main__":
  main()
