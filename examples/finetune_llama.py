"""Fine-tune a LLaMA with BlockLLM and compare with AdamW (LoRA, BAdam, BREAD).

With no arguments: pretrains (or reuses from --cache-dir) a small LLaMA on
the English text shipped with Python, fine-tunes it on a generated
instruction task (reverse / sort / add / upper) with each optimizer, and
prints a table (final train loss, held-out exact match, optimizer-state
bytes, compiled train-step memory, median step time) and saves a loss plot.

  python examples/finetune_llama.py
  python examples/finetune_llama.py --optimizer blockllm --sparsity 0.95
  python examples/finetune_llama.py --model-dir ~/models/my-llama --data pairs.jsonl
  python examples/finetune_llama.py --resume      # continue an interrupted run

--model-dir takes a local Hugging Face LLaMA checkpoint (config.json,
*.safetensors or a sharded index, and tokenizer.json if it has one);
--data takes prompt/answer pairs (.json/.jsonl/.parquet/.csv, loaded with
`datasets`); --export writes each fine-tuned model back in that format.
"""

from __future__ import annotations

import llama_common as common  # sets the offline HF environment first

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import blockllm_jax as bl
from blockllm_jax import data
from blockllm_jax import models
from blockllm_jax.models import LlamaForCausalLM, causal_lm_loss

OPTIMIZERS = ("blockllm", "adamw", "lora", "badam", "bread")
DEFAULT_OPTIMIZERS = ("blockllm", "adamw")
# Swept on the default task at 2000 steps (held-out exact match decided):
# AdamW {1e-3, 2e-3, 5e-3}, BlockLLM {1e-3, 2e-3, 3e-3, 5e-3}, BAdam {1e-3,
# 2e-3, 5e-3}, BREAD {1e-3, 2e-3, 5e-3}, LoRA {5e-3, 2e-2} (lowest loss).
DEFAULT_LR = {"blockllm": 2e-3, "adamw": 1e-3, "lora": 2e-2, "badam": 1e-3,
              "bread": 1e-3}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--optimizer", choices=OPTIMIZERS + ("all",), nargs="+",
                 default=list(DEFAULT_OPTIMIZERS),
                 help="one or more methods; 'all' runs every one")
  p.add_argument("--model-dir", type=Path, default=None,
                 help="a local Hugging Face LLaMA checkpoint to fine-tune "
                      "instead of the built-in pretrained model")
  common.add_model_arguments(p)
  p.add_argument("--pretrain-steps", type=int, default=400)
  p.add_argument("--pretrain-seq-len", type=int, default=64)
  p.add_argument("--data", type=Path, default=None,
                 help="prompt/answer pairs (.json/.jsonl/.parquet/.csv); default: "
                      "the generated instruction task")
  p.add_argument("--prompt-field", default=None)
  p.add_argument("--answer-field", default=None)
  p.add_argument("--tasks", nargs="+", choices=sorted(data.TASKS),
                 default=sorted(data.TASKS), help="generated tasks to mix")
  p.add_argument("--steps", type=int, default=2000, help="fine-tuning steps per optimizer")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=None,
                 help="fine-tuning learning rate for every method; default: "
                      + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--patience", type=int, default=50)
  p.add_argument("--train-embeddings", action="store_true",
                 help="let BlockLLM select, and BAdam / BREAD make blocks of, the "
                      "embedding and output head (excluded by default, as in the papers)")
  p.add_argument("--switch-every", type=int, default=100,
                 help="BAdam / BREAD: steps per block")
  p.add_argument("--block-order", choices=("random", "ascending", "descending"),
                 default="random", help="BAdam / BREAD: order of the blocks")
  p.add_argument("--correction-scale", type=float, default=1.0,
                 help="BREAD: SGD step of the inactive blocks, as a multiple of --lr")
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--lora-alpha", type=float, default=16.0)
  p.add_argument("--train-examples", type=int, default=4000)
  p.add_argument("--eval-examples", type=int, default=256)
  p.add_argument("--save-every", type=int, default=250)
  p.add_argument("--resume", action="store_true",
                 help="continue each optimizer from its latest checkpoint in --out-dir")
  p.add_argument("--export", action="store_true",
                 help="save each fine-tuned model as a Hugging Face checkpoint")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
  p.add_argument("--out-dir", type=Path, default=Path("runs/finetune"))
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if "all" in args.optimizer:
    args.optimizer = list(OPTIMIZERS)
  return args


def pretrained_model(args):
  """(settings, params, tokenizer) in the layout of --scan-layers / --remat."""
  settings, params, tokenizer = checkpoint_model(args)
  settings, params = common.with_layout(args, settings, params)
  return settings, params, tokenizer


def checkpoint_model(args):
  """(settings, params, tokenizer): --model-dir, or the built-in model.

  The built-in model is pretrained on the embedded corpus once and cached as
  a Hugging Face checkpoint, so it is loaded exactly like a user's.
  """
  if args.model_dir is not None:
    settings, params = models.load_hf_checkpoint(args.model_dir)
    tokenizer = (data.load_tokenizer(args.model_dir)
                 if (args.model_dir / "tokenizer.json").exists() else data.ByteTokenizer())
    if tokenizer.vocab_size > settings.vocab_size:
      raise ValueError(f"The tokenizer has {tokenizer.vocab_size} tokens but the "
                       f"model in {args.model_dir} only {settings.vocab_size}.")
    return settings, params, tokenizer
  corpus = data.embedded_corpus()
  tokenizer = common.corpus_tokenizer(args.tokenizer, corpus, args.cache_dir,
                                      args.bpe_vocab)
  settings = common.llama_settings(args, tokenizer.vocab_size)
  folder = args.cache_dir / (
      f"llama_{args.tokenizer}{tokenizer.vocab_size}_h{settings.hidden_size}"
      f"_l{settings.num_hidden_layers}_a{settings.num_attention_heads}"
      f"_kv{settings.num_key_value_heads}_s{args.pretrain_steps}_seed{args.seed}")
  if (folder / "config.json").exists():
    settings, params = models.load_hf_checkpoint(folder)
    return settings, params, tokenizer
  model = LlamaForCausalLM(settings)
  params = model.init(jax.random.PRNGKey(args.seed),
                      jnp.zeros((1, 8), jnp.int32))["params"]
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, 20, max(args.pretrain_steps, 21)))

  @jax.jit
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(
        lambda p: causal_lm_loss(model.apply({"params": p}, tokens), tokens))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  batch_at = common.window_sampler(np.asarray(tokenizer.encode(corpus), np.int32),
                                   args.pretrain_seq_len, args.batch_size, args.seed)
  params, _, _, _ = common.train(step, params, tx.init(params), batch_at,
                                 args.pretrain_steps, desc="pretrain",
                                 progress=not args.no_progress)
  models.save_hf_checkpoint(folder, settings, params)
  return settings, params, tokenizer


def instruction_data(args, tokenizer):
  """(train, held_out) InstructionSets from --data or the generated task."""
  if args.data is not None:
    pairs = data.load_instructions(args.data, prompt_field=args.prompt_field,
                                   answer_field=args.answer_field)
    if len(pairs) < 2:
      raise ValueError(f"--data {args.data} has {len(pairs)} examples; need at least 2.")
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    held = min(args.eval_examples, max(1, len(pairs) // 10))
    examples = data.encode_instructions(pairs, tokenizer)
    num_train = len(pairs) - held
  else:
    num_train = args.train_examples
    examples = data.make_instruction_set(args.train_examples + args.eval_examples,
                                         seed=args.seed, tasks=tuple(args.tasks),
                                         tokenizer=tokenizer)
  split = lambda a, b: data.InstructionSet(*(x[a:b] for x in examples))
  return split(0, num_train), split(num_train, len(examples.answers))


def make_optimizer(name, args, params, settings):
  lr = DEFAULT_LR[name] if args.lr is None else args.lr
  layer_axis = common.layer_axis_of(settings)
  if name == "adamw":
    return optax.adamw(lr, weight_decay=0.0)
  if name == "lora":
    # Adam on the adapters only; the base weights get no update and no state.
    labels = jax.tree.map(lambda is_adapter: "adapter" if is_adapter else "frozen",
                          models.lora_mask(params))
    return optax.multi_transform({"adapter": optax.adamw(lr, weight_decay=0.0),
                                  "frozen": optax.set_to_zero()}, labels)
  if name in ("badam", "bread"):
    blocks = dict(switch_every=args.switch_every, order=args.block_order,
                  include_embedding=args.train_embeddings,
                  include_head=args.train_embeddings, seed=args.seed,
                  layer_axis=layer_axis)
    if name == "badam":
      return bl.badam(lr, **blocks)
    return bl.bread(lr, correction="sgd", correction_scale=args.correction_scale,
                    **blocks)
  eligible = (lambda path, leaf: True) if args.train_embeddings else None
  return bl.blockllm(lr, sparsity=args.sparsity, patience=args.patience,
                     eligible=eligible, layer_axis=layer_axis)


@functools.lru_cache(maxsize=8)
def greedy_decoder(model, width: int, max_answer: int, pad_id: int):
  """A jitted ``decode(params, tokens, prompt_len)``: greedy completion of
  ``max_answer`` tokens after each prompt. Cached, so the baseline and every
  method with the same model share one compilation."""

  @jax.jit
  def decode(params, tokens, prompt_len):
    rows = jnp.arange(tokens.shape[0])
    # Blank everything after the prompt, then fill it one token at a time.
    tokens = jnp.where(jnp.arange(width)[None] < prompt_len[:, None], tokens,
                       pad_id)

    def body(j, tokens):
      logits = model.apply({"params": params}, tokens)
      at = jnp.minimum(prompt_len + j, width - 1)
      return tokens.at[rows, at].set(jnp.argmax(logits[rows, at - 1], -1))
    return jax.lax.fori_loop(0, max_answer, body, tokens)
  return decode


def exact_match(model, params, examples, tokenizer, batch_size=256):
  """Greedy decoding after the prompt; fraction of answers matching exactly."""
  max_answer = int(np.max(np.sum(examples.loss_mask > 0, axis=1)))
  decode = greedy_decoder(model, examples.tokens.shape[1], max_answer,
                          tokenizer.pad_id)
  correct = 0
  for start in range(0, len(examples.answers), batch_size):
    stop = start + batch_size
    out = np.asarray(decode(params, jnp.asarray(examples.tokens[start:stop]),
                            jnp.asarray(examples.prompt_length[start:stop])))
    for row, begin, answer in zip(out, examples.prompt_length[start:stop],
                                  examples.answers[start:stop]):
      generated = list(row[begin:])
      end = generated.index(tokenizer.eos_id) if tokenizer.eos_id in generated else len(generated)
      correct += tokenizer.decode(generated[:end]) == answer
  return correct / len(examples.answers)


def finetune(model, params, name, train, args):
  """Fine-tunes with one method; returns (params, result dict)."""
  tx = make_optimizer(name, args, params, model.settings)
  state = tx.init(params)

  def loss_fn(params, tokens, mask):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens, mask)

  def step(params, state, tokens, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  def batch_at(t):
    idx = common.step_rng(args.seed + 1, t).integers(0, len(train.answers), args.batch_size)
    return jnp.asarray(train.tokens[idx]), jnp.asarray(train.loss_mask[idx])

  # Compiled once: the loop runs the executable whose memory is reported.
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, state, *batch_at(0)).compile()
  memory = bl.CompiledMemory.of(compiled)
  checkpoints = common.TrainCheckpoints(args.out_dir / "checkpoints" / name,
                                        args.save_every)
  params, state, losses, seconds = common.train(
      compiled, jax.tree.map(jnp.copy, params), state,
      batch_at, args.steps, desc=f"finetune {name}", checkpoints=checkpoints,
      resume=args.resume, progress=not args.no_progress)
  checkpoints.close()
  result = {
      "optimizer": name, "losses": losses,
      "final_loss": float(np.mean(losses[-20:])),
      "state_bytes": bl.state_bytes(state), "step_memory": memory.total,
      "median_step_ms": common.median_step_ms(seconds),
  }
  if name in ("blockllm", "badam", "bread"):
    result["reselections"] = int(bl.reselection_count(state))
  return params, result


def main(argv=None):
  args = parse_args(argv)
  settings, params, tokenizer = pretrained_model(args)
  train, held_out = instruction_data(args, tokenizer)
  model = LlamaForCausalLM(settings)
  baseline = exact_match(model, params, held_out, tokenizer)
  rows = []
  for name in args.optimizer:
    if name == "lora":
      run_settings, run_params = models.add_lora(
          settings, params, rank=args.lora_rank, alpha=args.lora_alpha,
          rng=jax.random.PRNGKey(args.seed))
    else:
      run_settings, run_params = settings, params
    run_model = LlamaForCausalLM(run_settings)
    tuned, result = finetune(run_model, run_params, name, train, args)
    result["exact_match"] = exact_match(run_model, tuned, held_out, tokenizer)
    rows.append(result)
    if args.export:
      export_dir = args.out_dir / f"hf_{name}"
      models.save_hf_checkpoint(export_dir, run_settings, tuned, tokenizer=tokenizer)
      print(f"saved {export_dir}")
  common.plot_losses({r["optimizer"]: r["losses"] for r in rows},
                     args.out_dir / "finetune_loss.png", xlabel="fine-tuning step",
                     ylabel="answer-token loss")
  print(f"\nheld-out exact match before fine-tuning: {100 * baseline:.1f}% "
        f"({len(held_out.answers)} prompts)")
  common.print_table(
      ("optimizer", "final loss", "exact match", "state bytes", "step memory",
       "median step", "selections"),
      [(r["optimizer"], f"{r['final_loss']:.4f}", f"{100 * r['exact_match']:.1f}%",
        f"{r['state_bytes'] / 1e6:.3f} MB", f"{r['step_memory'] / 1e6:.2f} MB",
        f"{r['median_step_ms']:.1f} ms", str(r.get("reselections", "-")))
       for r in rows])
  print(f"loss plot: {args.out_dir / 'finetune_loss.png'}")
  return {"baseline_exact_match": baseline, "results": rows}


if __name__ == "__main__":
  main()
