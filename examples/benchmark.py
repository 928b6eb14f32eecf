"""Benchmark the optimizers a memory-limited user would pick, on our LLaMA.

Methods (same model, data, seed and token count for each):

- ``adamw``: ``optax.adamw``, the reference.
- ``galore``: ``optax.contrib.galore`` (Adam in a rank-r gradient subspace).
- ``lora``: AdamW on rank-r adapters of every attention and MLP projection,
  the base weights frozen.
- ``badam`` / ``bread-sgd``: block coordinate descent over layers, BREAD
  correcting the inactive blocks with SGD.
- ``blockllm`` / ``blockllm-lean``: BlockLLM on ``jax.value_and_grad``, and
  on ``bl.lean_value_and_grad`` (tiers B and C).

Stages (``--stages``):

- ``memory``: optimizer-state bytes and the compiled train step's memory
  (arguments, temporaries, total) from XLA's memory analysis, compiled on
  abstract shapes (nothing is allocated, so ``--sizes llama-7b`` works on a
  laptop), next to the bytes-per-parameter memory model of the README.
- ``speed``: median step time and tokens/s after warm-up, ratio to AdamW
  (sizes small enough to allocate); ``--peak`` on a GPU adds
  ``peak_bytes_in_use`` from a fresh process per method.
- ``pretrain``: held-out loss / perplexity after a fixed token budget on the
  embedded corpus, best of a learning-rate sweep per method (the sweep is
  reported).
- ``finetune``: held-out exact match on the fine-tuning demo's instruction
  task after the same number of steps, best of the same sweep.

Writes ``results.json``, ``tables.md`` and PNG plots (loss curves, memory
bars, memory against model size) to ``--out``.

  python examples/benchmark.py                        # CPU: all stages
  python examples/benchmark.py --stages memory --sizes cpu-13m gpu-1b llama-7b \\
      --param-dtype bfloat16 --dtype bfloat16         # what fits on a card
"""

from __future__ import annotations

import llama_common as common  # sets the offline HF environment first

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blockllm_jax as bl
from blockllm_jax import data
from blockllm_jax import models
from blockllm_jax.models import LlamaForCausalLM
from blockllm_jax.models import causal_lm_loss

METHODS = ("adamw", "galore", "lora", "badam", "bread-sgd", "blockllm",
           "blockllm-lean")
# Centre of each method's learning-rate sweep (the sweep multiplies it by
# --lr-factors); GaLore and LoRA take larger rates, as in their papers.
CENTER_LR = {"adamw": 1e-3, "galore": 1e-2, "lora": 1e-2, "badam": 1e-3,
             "bread-sgd": 1e-3, "blockllm": 1e-3, "blockllm-lean": 1e-3}
STAGES = ("memory", "speed", "pretrain", "finetune")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--sizes", nargs="+", choices=sorted(common.MODEL_SIZES),
                 default=["cpu-4m", "cpu-13m"],
                 help="model sizes of the memory and speed stages")
  p.add_argument("--batch", type=int, default=4, help="memory/speed batch")
  p.add_argument("--seq", type=int, default=128, help="memory/speed length")
  p.add_argument("--dtype", default="float32", help="activation dtype")
  p.add_argument("--param-dtype", default="float32")
  p.add_argument("--speed-steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--peak", action="store_true",
                 help="GPU: peak_bytes_in_use from a fresh process per method")
  p.add_argument("--quality-size", default="cpu-4m",
                 choices=sorted(common.MODEL_SIZES))
  p.add_argument("--quality-steps", type=int, default=300)
  p.add_argument("--quality-batch", type=int, default=16)
  p.add_argument("--quality-seq", type=int, default=128)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--finetune-steps", type=int, default=300)
  p.add_argument("--finetune-args", default="",
                 help="extra flags for the fine-tuning demo's model and data, "
                      "e.g. '--pretrain-steps 400 --train-examples 4000'")
  p.add_argument("--lr-factors", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                 help="the sweep: multiples of each method's centre rate")
  p.add_argument("--sparsity", type=float, default=0.9, help="BlockLLM")
  p.add_argument("--patience", type=int, default=50, help="BlockLLM")
  p.add_argument("--switch-every", type=int, default=50, help="BAdam/BREAD")
  p.add_argument("--rank", type=int, default=None,
                 help="GaLore and LoRA rank (default: hidden size / 8)")
  p.add_argument("--galore-gap", type=int, default=200,
                 help="GaLore: steps between projection updates")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=Path("runs/benchmark"))
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--single", choices=METHODS, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# --------------------------------------------------------------- building --


def rank_of(settings, args) -> int:
  return args.rank or max(4, settings.hidden_size // 8)


def make_model(settings, args):
  return LlamaForCausalLM(settings, dtype=jnp.dtype(args.dtype),
                          param_dtype=jnp.dtype(args.param_dtype))


def init_params(method, settings, args, *, abstract: bool):
  """(settings, params) of a method; LoRA adds adapters. ``abstract``:
  ``jax.ShapeDtypeStruct`` leaves, nothing allocated."""
  model = make_model(settings, args)
  key = jax.random.PRNGKey(args.seed)
  init = lambda: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
  lora_settings = []

  def build():
    params = init()
    if method == "lora":
      settings_, params = models.add_lora(settings, params, rank_of(settings, args),
                                          jax.random.fold_in(key, 1))
      lora_settings.append(settings_)
    return params

  params = jax.eval_shape(build) if abstract else build()
  if method == "lora" and abstract:
    # eval_shape traced `build`; its settings are static values.
    return lora_settings[0], params
  return (lora_settings[0] if lora_settings else settings), params


def make_optimizer(method, params, lr, steps, settings, args):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, max(1, steps // 10), max(steps, 2), lr / 10)
  if method == "adamw":
    return optax.adamw(schedule, weight_decay=0.0)
  if method == "galore":
    if not hasattr(optax.contrib, "galore"):
      raise SystemExit(f"--methods galore needs an optax with "
                       f"optax.contrib.galore (0.2.8 has it); this is "
                       f"{optax.__version__}.")
    return optax.contrib.galore(schedule, rank=rank_of(settings, args),
                                update_proj_gap=args.galore_gap, scale=0.25)
  if method == "lora":
    labels = jax.tree.map(lambda a: "adapter" if a else "frozen",
                          models.lora_mask(params))
    return optax.multi_transform({"adapter": optax.adamw(schedule, weight_decay=0.0),
                                  "frozen": optax.set_to_zero()}, labels)
  # From scratch the embedding and head must learn too: every method trains
  # every tensor (LoRA aside).
  blocks = dict(switch_every=args.switch_every, include_embedding=True,
                include_head=True, seed=args.seed)
  if method == "badam":
    return bl.badam(schedule, **blocks)
  if method == "bread-sgd":
    return bl.bread(schedule, correction="sgd", **blocks)
  return bl.blockllm(schedule, sparsity=args.sparsity, patience=args.patience,
                     eligible=lambda path, leaf: True)


def make_step(method, model, tx):
  """``step(params, state, tokens[, mask]) -> (params, state, loss)`` and
  ``loss_fn(params, tokens[, mask])``."""
  tx = optax.with_extra_args_support(tx)

  def loss_fn(params, tokens, *mask):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens, *mask)

  if method.endswith("-lean"):
    grad_fn = bl.lean_value_and_grad(loss_fn)
  else:
    grad_fn = lambda params, state, *batch: jax.value_and_grad(loss_fn)(params, *batch)

  def step(params, state, *batch):
    loss, grads = grad_fn(params, state, *batch)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss
  return step, loss_fn


def setup(method, settings, args, *, lr, steps, abstract=False):
  settings, params = init_params(method, settings, args, abstract=abstract)
  model = make_model(settings, args)
  tx = make_optimizer(method, params, lr, steps, settings, args)
  state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)
  step, loss_fn = make_step(method, model, tx)
  return params, state, step, loss_fn


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def memory_model(method, params, state) -> int:
  """Bytes the README's memory model predicts: weights + optimizer state +
  the gradient the step holds (activations not included)."""
  from blockllm_jax import memory
  return nbytes(params) + nbytes(state) + memory.held_gradient_bytes(
      method, params, train_embeddings=True)


# ---------------------------------------------------------------- stages --


# One learning-rate schedule for the memory and speed stages, so that they
# share one compiled step (its constants are part of the program).
MEASURE_LR, MEASURE_STEPS = 1e-4, 1000


def compile_step(method, size, args):
  """The method's train step compiled on abstract shapes (nothing is
  allocated), with its memory row."""
  settings = common.sized_settings(size)
  params, state, step, _ = setup(method, settings, args, lr=MEASURE_LR,
                                 steps=MEASURE_STEPS, abstract=True)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  begin = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, tokens).compile()
  memory = bl.CompiledMemory.of(compiled)
  row = dict(stage="memory", method=method, size=size,
             params=int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
             state_bytes=nbytes(state), argument=memory.argument,
             temp=memory.temp, total=memory.total,
             model_bytes=memory_model(method, params, state),
             compile_s=time.perf_counter() - begin)
  return compiled, row


def speed_row(method, size, args, compiled=None):
  """Times ``compiled`` (compiled here if None) on random tokens."""
  if compiled is None:
    compiled, _ = compile_step(method, size, args)
  settings = common.sized_settings(size)
  params, state, _, _ = setup(method, settings, args, lr=MEASURE_LR,
                              steps=MEASURE_STEPS)
  rng = np.random.default_rng(args.seed)
  batch = lambda: jnp.asarray(rng.integers(0, settings.vocab_size,
                                           (args.batch, args.seq)), jnp.int32)
  seconds = []
  for t in range(args.warmup + args.speed_steps):
    tokens = batch()
    begin = time.perf_counter()
    params, state, loss = compiled(params, state, tokens)
    loss.block_until_ready()
    if t >= args.warmup:
      seconds.append(time.perf_counter() - begin)
  step_s = float(np.median(seconds))
  stats = jax.devices()[0].memory_stats() or {}
  return dict(stage="speed", method=method, size=size, step_ms=1e3 * step_s,
              tokens_per_s=args.batch * args.seq / step_s,
              peak_bytes_in_use=stats.get("peak_bytes_in_use"))


def fresh_process_speed_row(method, size, args):
  """``speed_row`` of one method alone in a new process, so the GPU's
  ``peak_bytes_in_use`` is that method's own peak."""
  command = [sys.executable, __file__, *args.argv, "--single", method,
             "--sizes", size]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{method} at {size} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(method, settings, args, *, steps, batch_at, evaluate, desc):
  """Trains once per learning rate; returns the runs, best first."""
  runs = []
  for factor in args.lr_factors:
    lr = CENTER_LR[method] * factor
    params, state, step, loss_fn = setup(method, settings, args, lr=lr, steps=steps)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, state, *batch_at(0)).compile()
    params, state, losses, seconds = common.train(
        compiled, params, state, batch_at, steps, desc=f"{desc} {method} lr={lr:g}",
        progress=not args.no_progress)
    score = evaluate(params, loss_fn, settings, method)
    runs.append(dict(lr=lr, losses=losses, score=score,
                     median_step_ms=common.median_step_ms(seconds)))
  return runs


def pretrain_rows(args):
  corpus = data.embedded_corpus()
  tokenizer = data.ByteTokenizer()
  tokens = np.asarray(tokenizer.encode(corpus), np.int32)
  split = int(0.95 * tokens.size)
  settings = common.sized_settings(args.quality_size, tokenizer.vocab_size)
  batch_at = common.window_sampler(tokens[:split], args.quality_seq,
                                   args.quality_batch, args.seed)
  held_out = [common.window_sampler(tokens[split:], args.quality_seq,
                                    args.quality_batch, args.seed + 1)(i)[0]
              for i in range(args.eval_batches)]

  def evaluate(params, loss_fn, settings, method):
    loss = jax.jit(loss_fn)
    return float(np.mean([loss(params, b) for b in held_out]))

  rows = []
  for method in args.methods:
    runs = sweep(method, settings, args, steps=args.quality_steps,
                 batch_at=batch_at, evaluate=evaluate, desc="pretrain")
    best = min(runs, key=lambda r: r["score"] if np.isfinite(r["score"]) else np.inf)
    rows.append(dict(stage="pretrain", method=method, size=args.quality_size,
                     tokens=args.quality_steps * args.quality_batch * args.quality_seq,
                     best_lr=best["lr"], eval_loss=best["score"],
                     perplexity=float(np.exp(best["score"])),
                     losses=best["losses"],
                     sweep={f"{r['lr']:g}": r["score"] for r in runs}))
  return rows


def finetune_rows(args):
  import finetune_llama as demo
  demo_args = demo.parse_args(args.finetune_args.split() + [
      "--seed", str(args.seed), "--batch-size", "32", "--no-progress"])
  base_settings, base_params, tokenizer = demo.pretrained_model(demo_args)
  train, held_out = demo.instruction_data(demo_args, tokenizer)

  def batch_at(t):
    idx = common.step_rng(args.seed + 1, t).integers(0, len(train.answers), 32)
    return jnp.asarray(train.tokens[idx]), jnp.asarray(train.loss_mask[idx])

  rows = []
  for method in args.methods:
    runs = []
    for factor in args.lr_factors:
      lr = CENTER_LR[method] * factor
      settings, params = base_settings, jax.tree.map(jnp.copy, base_params)
      if method == "lora":
        settings, params = models.add_lora(settings, params, rank_of(settings, args),
                                           jax.random.PRNGKey(args.seed))
      model = LlamaForCausalLM(settings)
      tx = make_optimizer(method, params, lr, args.finetune_steps, settings, args)
      step, _ = make_step(method, model, tx)
      compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
          params, tx.init(params), *batch_at(0)).compile()
      params, _, losses, _ = common.train(
          compiled, params, tx.init(params), batch_at, args.finetune_steps,
          desc=f"finetune {method} lr={lr:g}", progress=not args.no_progress)
      runs.append(dict(lr=lr, losses=losses,
                       score=demo.exact_match(model, params, held_out, tokenizer)))
    best = max(runs, key=lambda r: r["score"])
    rows.append(dict(stage="finetune", method=method, best_lr=best["lr"],
                     exact_match=best["score"], losses=best["losses"],
                     sweep={f"{r['lr']:g}": r["score"] for r in runs}))
  return rows


# --------------------------------------------------------------- reports --


def mb(x):
  return "n/a" if x is None else f"{x / 1e6:,.1f}"


def tables(rows, args):
  """(title, header, rows) of every stage that ran."""
  out = []
  memory = [r for r in rows if r["stage"] == "memory"]
  if memory:
    body = []
    for r in memory:
      ref = next((m for m in memory if m["size"] == r["size"]
                  and m["method"] == "adamw"), None)
      body.append([r["size"], f"{r['params'] / 1e6:,.1f}M", r["method"],
                   mb(r["state_bytes"]), mb(r["argument"]), mb(r["temp"]),
                   mb(r["total"]),
                   f"{r['total'] / ref['total']:.2f}" if ref else "",
                   mb(r["model_bytes"]), f"{r['model_bytes'] / r['total']:.2f}",
                   f"{r['total'] / 2**30:.1f}"])
    out.append(("Compiled train-step memory (batch "
                f"{args.batch} x seq {args.seq}, params {args.param_dtype}, "
                f"activations {args.dtype})",
                ["size", "params", "method", "state MB", "arguments MB",
                 "temporaries MB", "total MB", "÷ adamw", "model MB",
                 "model ÷ total", "total GiB"], body))
  speed = [r for r in rows if r["stage"] == "speed"]
  if speed:
    body = []
    for r in speed:
      ref = next((m for m in speed if m["size"] == r["size"]
                  and m["method"] == "adamw"), None)
      body.append([r["size"], r["method"], f"{r['step_ms']:.1f}",
                   f"{r['tokens_per_s']:,.0f}",
                   f"{r['step_ms'] / ref['step_ms']:.2f}" if ref else "",
                   mb(r.get("peak_bytes_in_use"))])
    out.append(("Step time (median after warm-up)",
                ["size", "method", "step ms", "tokens/s", "÷ adamw time",
                 "GPU peak MB"], body))
  pretrain = [r for r in rows if r["stage"] == "pretrain"]
  if pretrain:
    out.append((f"Pretraining on the embedded corpus ({pretrain[0]['size']}, "
                f"{pretrain[0]['tokens']:,} tokens, best of the sweep)",
                ["method", "best lr", "held-out loss", "perplexity",
                 "sweep (lr: held-out loss)"],
                [[r["method"], f"{r['best_lr']:g}", f"{r['eval_loss']:.4f}",
                  f"{r['perplexity']:.2f}",
                  ", ".join(f"{k}: {v:.3f}" for k, v in r["sweep"].items())]
                 for r in pretrain]))
  finetune = [r for r in rows if r["stage"] == "finetune"]
  if finetune:
    out.append((f"Fine-tuning on the demo's instruction task "
                f"({args.finetune_steps} steps, best of the sweep)",
                ["method", "best lr", "exact match", "sweep (lr: exact match)"],
                [[r["method"], f"{r['best_lr']:g}",
                  f"{100 * r['exact_match']:.1f}%",
                  ", ".join(f"{k}: {100 * v:.1f}%" for k, v in r["sweep"].items())]
                 for r in finetune]))
  return out


def plots(rows, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  written = []
  for stage, ylabel in (("pretrain", "next-token loss"),
                        ("finetune", "answer-token loss")):
    curves = {f"{r['method']} (lr {r['best_lr']:g})": r["losses"]
              for r in rows if r["stage"] == stage}
    if curves:
      path = args.out / f"{stage}_loss.png"
      common.plot_losses(curves, path, xlabel="step", ylabel=ylabel,
                         title=f"{stage}: best learning rate per method")
      written.append(path)
  memory = [r for r in rows if r["stage"] == "memory"]
  if memory:
    common.plot_memory_bars(memory, args.out / "memory_bars.png")
    written.append(args.out / "memory_bars.png")
    sizes = list(dict.fromkeys(r["size"] for r in memory))
    if len(sizes) > 1:
      fig, ax = plt.subplots(figsize=(6, 4))
      for i, method in enumerate(dict.fromkeys(r["method"] for r in memory)):
        by = sorted((r for r in memory if r["method"] == method),
                    key=lambda r: r["params"])
        ax.plot([r["params"] for r in by], [r["total"] / 1e9 for r in by],
                "o-", color=f"C{i}", label=method)
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("parameters")
      ax.set_ylabel("compiled train step, GB")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      fig.tight_layout()
      fig.savefig(args.out / "memory_vs_size.png", dpi=120)
      plt.close(fig)
      written.append(args.out / "memory_vs_size.png")
  return written


def main(argv=None):
  args = parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if args.single:
    print(json.dumps(speed_row(args.single, args.sizes[0], args)))
    return None
  args.out.mkdir(parents=True, exist_ok=True)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, optax {optax.__version__}")
  memory_rows, speed_rows = [], []
  jobs = []
  if {"memory", "speed"} & set(args.stages):
    jobs = [(size, method) for size in args.sizes for method in args.methods]
  fresh = args.peak and jax.default_backend() == "gpu"
  for i, (size, method) in enumerate(common.tqdm(
      jobs, desc="memory and speed", disable=args.no_progress)):
    compiled = None
    if "memory" in args.stages:
      compiled, row = compile_step(method, size, args)
      memory_rows.append(row)
    if "speed" in args.stages:
      speed_rows.append(fresh_process_speed_row(method, size, args) if fresh
                        else speed_row(method, size, args, compiled))
    del compiled
    if i + 1 == len(jobs) or jobs[i + 1][0] != size:
      jax.clear_caches()  # a size's programs are not needed for the next
  rows = memory_rows + speed_rows
  if "pretrain" in args.stages:
    rows += pretrain_rows(args)
  if "finetune" in args.stages:
    rows += finetune_rows(args)

  (args.out / "results.json").write_text(json.dumps(
      dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
           jax=jax.__version__, optax=optax.__version__, args=vars(args),
           rows=rows), indent=1, default=str))
  markdown = []
  for title, header, body in tables(rows, args):
    print(f"\n{title}")
    common.print_table(header, body)
    markdown += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "---|" * len(header)]
    markdown += ["| " + " | ".join(row) + " |" for row in body] + [""]
  (args.out / "tables.md").write_text("\n".join(markdown))
  written = plots(rows, args)
  print(f"\nwrote {args.out}/results.json, tables.md, "
        + ", ".join(p.name for p in written))
  return rows


if __name__ == "__main__":
  main()
