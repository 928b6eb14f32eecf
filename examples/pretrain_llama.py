"""Pretrain a LLaMA from scratch with BlockLLM, with checkpoints and a loss plot.

With no arguments: trains a small LLaMA on the English text shipped with
Python (``pydoc_data``), evaluates on a held-out tail of the corpus, saves
orbax checkpoints, a loss plot and a Hugging Face checkpoint
(``config.json`` + ``model.safetensors`` + the tokenizer) that
``transformers.LlamaForCausalLM.from_pretrained`` and
``examples/finetune_llama.py --model-dir`` load.

  python examples/pretrain_llama.py
  python examples/pretrain_llama.py --data my_corpus.txt --tokenizer bpe
  python examples/pretrain_llama.py --optimizer adamw --steps 2000
  python examples/pretrain_llama.py --resume   # continue an interrupted run
  python examples/pretrain_llama.py --mesh data=2,fsdp=4   # 8 devices, FSDP
  python examples/pretrain_llama.py --mesh data=2,fsdp=4 --lean

With ``--mesh``, the parameters are sharded over the ``--fsdp-axes`` of a
device mesh (each leaf along its largest divisible dimension, small ones
replicated), the batch over every mesh axis, and the optimizer state with
the parameters (``param_sharding=``, ``blockllm_jax.state_sharding``). On a
CPU machine the devices are simulated (``jax_num_cpu_devices``). ``--lean``
computes only the gradients BlockLLM uses (``lean_value_and_grad``), on one
device or sharded.
"""

from __future__ import annotations

import llama_common as common  # sets the offline HF environment first

import argparse
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blockllm_jax as bl
from blockllm_jax import data
from blockllm_jax.models import LlamaForCausalLM, causal_lm_loss, save_hf_checkpoint


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data", type=Path, default=None,
                 help="a local .txt/.json/.jsonl/.parquet/.csv corpus (loaded "
                      "with `datasets`); default: the embedded pydoc_data text")
  p.add_argument("--text-field", default="text", help="column of --data holding text")
  p.add_argument("--optimizer", choices=("blockllm", "adamw"), default="blockllm")
  common.add_model_arguments(p)
  p.add_argument("--steps", type=int, default=600)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--sparsity", type=float, default=0.5,
                 help="BlockLLM: fraction of coordinates not trained per step")
  p.add_argument("--patience", type=int, default=20)
  p.add_argument("--train-embeddings", action=argparse.BooleanOptionalAction,
                 default=True, help="let BlockLLM select the embedding and head "
                                    "(from scratch they must learn too)")
  p.add_argument("--lean", action="store_true",
                 help="BlockLLM: lean train step (blockllm_jax."
                      "lean_value_and_grad: only the selected leaves' "
                      "gradients are computed); works with --mesh")
  p.add_argument("--eval-every", type=int, default=100)
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--save-every", type=int, default=200)
  p.add_argument("--resume", action="store_true",
                 help="continue from the latest checkpoint in --out-dir")
  p.add_argument("--mesh", type=parse_mesh, default=None,
                 help="device mesh as axis=size pairs, e.g. data=2,fsdp=4 "
                      "(default: one device)")
  p.add_argument("--fsdp-axes", default="fsdp",
                 help="comma-separated mesh axes the parameters are sharded "
                      "over (default fsdp; axes the mesh lacks are ignored, "
                      "none left: all axes)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out-dir", type=Path, default=Path("runs/pretrain"))
  p.add_argument("--no-progress", action="store_true")
  return p.parse_args(argv)


def parse_mesh(text: str) -> dict:
  """``'data=2,fsdp=4'`` -> ``{'data': 2, 'fsdp': 4}``."""
  mesh = {}
  for part in text.split(","):
    name, _, size = part.partition("=")
    if not name.strip() or not size.strip().isdigit() or int(size) < 1:
      raise argparse.ArgumentTypeError(
          f"--mesh wants axis=size pairs like data=2,fsdp=4; got {text!r}")
    mesh[name.strip()] = int(size)
  return mesh


def make_mesh(axes: dict):
  """A mesh of ``axes``; on CPU, simulates the devices it needs."""
  needed = int(np.prod(list(axes.values())))
  if jax.default_backend() == "cpu" and len(jax.devices()) < needed:
    raise SystemExit(
        f"--mesh needs {needed} devices, this process has "
        f"{len(jax.devices())}; run with XLA_FLAGS="
        f"--xla_force_host_platform_device_count={needed}.")
  if len(jax.devices()) < needed:
    raise SystemExit(f"--mesh needs {needed} devices; there are "
                     f"{len(jax.devices())}.")
  devices = np.asarray(jax.devices()[:needed]).reshape(list(axes.values()))
  return jax.sharding.Mesh(devices, tuple(axes))


def simulate_cpu_devices(axes: Optional[dict]):
  """Asks for enough CPU devices before JAX starts its backend."""
  if axes is None:
    return
  try:  # only possible before the first computation in this process
    jax.config.update("jax_num_cpu_devices", int(np.prod(list(axes.values()))))
  except RuntimeError:
    pass


def make_optimizer(args, settings, param_sharding=None):
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1), args.lr / 10)
  if args.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=0.0)
  eligible = (lambda path, leaf: True) if args.train_embeddings else None
  return bl.blockllm(schedule, sparsity=args.sparsity, patience=args.patience,
                     eligible=eligible, param_sharding=param_sharding,
                     layer_axis=common.layer_axis_of(settings))


def main(argv=None):
  args = parse_args(argv)
  simulate_cpu_devices(args.mesh)
  corpus = (data.load_text(args.data, text_field=args.text_field) if args.data
            else data.embedded_corpus())
  tokenizer = common.corpus_tokenizer(args.tokenizer, corpus, args.out_dir / "tokenizer",
                                      args.bpe_vocab)
  tokens = np.asarray(tokenizer.encode(corpus), np.int32)
  split = int(0.95 * tokens.size)  # the tail is held out for evaluation
  train_tokens, eval_tokens = tokens[:split], tokens[split:]
  settings, _ = common.with_layout(
      args, common.llama_settings(args, tokenizer.vocab_size))
  if settings.scan_layers and (args.lean or args.mesh is not None):
    raise SystemExit("--scan-layers does not combine with --lean or --mesh "
                     "yet (blockllm's layer_axis supports neither).")
  model = LlamaForCausalLM(settings)
  params = model.init(jax.random.PRNGKey(args.seed),
                      jnp.zeros((1, 8), jnp.int32))["params"]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"{num_params / 1e6:.2f}M parameters, {tokens.size} tokens "
        f"({tokens.size / max(len(corpus), 1):.2f} per character), "
        f"{args.optimizer}")
  mesh = param_sharding = None
  if args.mesh is not None:
    if args.optimizer == "adamw":
      raise SystemExit("--mesh is for --optimizer blockllm (the example's "
                       "point is its sharded compact state).")
    mesh = make_mesh(args.mesh)
    fsdp_axes = tuple(a for a in args.fsdp_axes.split(",") if a in args.mesh)
    param_sharding = bl.fsdp_sharding(params, mesh, fsdp_axes or None)
    params = jax.device_put(params, param_sharding)
    if args.batch_size % mesh.size:
      raise SystemExit(f"--batch-size {args.batch_size} must be a multiple "
                       f"of the {mesh.size} devices of --mesh.")
  tx = make_optimizer(args, settings, param_sharding)
  if mesh is None:
    opt_state = tx.init(params)
  else:
    opt_state = jax.jit(tx.init, out_shardings=bl.state_sharding(
        tx, params, param_sharding))(params)

  def loss_fn(params, tokens):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens)

  if args.lean and args.optimizer != "blockllm":
    raise SystemExit("--lean is for --optimizer blockllm.")
  # The lean helper returns a deferred backward pass that `tx.update` runs.
  grad_fn = (bl.lean_value_and_grad(loss_fn) if args.lean else
             lambda params, opt_state, tokens: jax.value_and_grad(loss_fn)(
                 params, tokens))

  def step(params, opt_state, tokens):
    loss, grads = grad_fn(params, opt_state, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  batch_at = common.window_sampler(train_tokens, args.seq_len, args.batch_size, args.seed)
  if mesh is not None:  # each device gets its rows of the batch
    batch_sharding = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))
    unsharded_batch_at = batch_at
    batch_at = lambda t: jax.device_put(unsharded_batch_at(t), batch_sharding)
  # Compiled once: the loop runs the executable whose memory is reported.
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, *batch_at(0)).compile()
  memory = bl.CompiledMemory.of(compiled)
  eval_loss = jax.jit(loss_fn)
  eval_batches = [common.window_sampler(eval_tokens, args.seq_len, args.batch_size,
                                 args.seed + 1)(i)[0] for i in range(args.eval_batches)]
  evaluations = {}  # str(step) -> held-out loss; JSON keys for the checkpoint

  def evaluate(params):
    return float(np.mean([eval_loss(params, b) for b in eval_batches]))

  def on_step(t, loss, params):
    if (t + 1) % args.eval_every == 0 or t + 1 == args.steps:
      evaluations[str(t + 1)] = evaluate(params)

  checkpoints = common.TrainCheckpoints(args.out_dir / "checkpoints", args.save_every)
  params, opt_state, losses, seconds = common.train(
      compiled, params, opt_state, batch_at, args.steps,
      desc=f"pretrain {args.optimizer}", checkpoints=checkpoints,
      resume=args.resume, progress=not args.no_progress, on_step=on_step,
      extras=evaluations)
  checkpoints.close()
  if str(args.steps) not in evaluations:
    evaluations[str(args.steps)] = evaluate(params)
  eval_steps = sorted(int(k) for k in evaluations)
  eval_losses = [evaluations[str(k)] for k in eval_steps]

  export_dir = args.out_dir / "hf"
  save_hf_checkpoint(export_dir, settings, params, tokenizer=tokenizer)
  common.plot_losses({f"{args.optimizer} train": losses}, args.out_dir / "pretrain_loss.png",
                     xlabel="step", ylabel="next-token loss",
                     points={"held-out": (eval_steps, eval_losses)})
  final_eval = eval_losses[-1]
  # Per device: one device's shards (the whole state without --mesh); the
  # compiled memory analysis of a sharded program is per device too.
  device_state = per_device_bytes(opt_state)
  common.print_table(
      ("optimizer", "devices", "params", "train loss", "held-out loss",
       "perplexity", "state bytes / device", "step memory / device",
       "median step"),
      [(args.optimizer + (" (lean)" if args.lean else ""),
        str(1 if mesh is None else mesh.size),
        f"{num_params / 1e6:.2f}M", f"{np.mean(losses[-20:]):.4f}",
        f"{final_eval:.4f}", f"{np.exp(final_eval):.1f}",
        f"{device_state / 1e6:.3f} MB", f"{memory.total / 1e6:.2f} MB",
        f"{common.median_step_ms(seconds):.1f} ms")])
  print(f"loss plot: {args.out_dir / 'pretrain_loss.png'}")
  print(f"Hugging Face checkpoint: {export_dir}")
  return {"losses": losses, "eval_steps": eval_steps, "eval_losses": eval_losses,
          "export_dir": export_dir,
          "params": params, "opt_state": opt_state,
          "state_bytes_per_device": device_state, "step_memory": memory}


def per_device_bytes(tree) -> int:
  """Bytes of ``tree`` on its first device (all of it when unsharded)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shards = leaf.addressable_shards
    total += shards[0].data.nbytes if shards else leaf.nbytes
  return total


if __name__ == "__main__":
  main()
