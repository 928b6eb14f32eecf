"""Peak memory and step time of the original PyTorch BlockLLM and BAdam.

The side-by-side half of ``examples/benchmark.py``: the same LLaMA shapes
(``llama_common.MODEL_SIZES``, built as a randomly initialised
``transformers.LlamaForCausalLM`` with eager attention, as our Flax model
computes it), the same batch shape, dtype policy and random tokens, trained
with

- ``adamw``: ``torch.optim.AdamW`` (PyTorch's reference point);
- ``blockllm``: ``blockllm_torch.BlockLLM`` from the authors' repository
  (https://github.com/RAmruthaVignesh/blockllm);
- ``badam``: ``badam.BlockOptimizer`` wrapping AdamW, from the authors'
  repository (https://github.com/Ledzy/BAdam).

Their code is not part of this project: pass the folders of your own
checkouts (``--blockllm-src``, the folder holding ``blockllm_torch/``;
``--badam-src``, the folder holding ``badam/``, i.e. ``BAdam/src``). Each
method runs in a fresh process so ``torch.cuda.max_memory_allocated`` is its
own peak. Before timing, BAdam is switched through every block once (one step
each) so its peak covers the largest block, as a long run would; then steps
are timed with its normal switching interval.

  python examples/torch_reference_benchmark.py --size gpu-350m \\
      --blockllm-src ~/src/blockllm --badam-src ~/src/BAdam/src

Prints a table and writes ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import llama_common as common  # sets the offline HF environment first

METHODS = ("adamw", "blockllm", "badam")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
  p.add_argument("--size", default="gpu-350m", choices=sorted(common.MODEL_SIZES))
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--param-dtype", default="bfloat16",
                 choices=("float32", "bfloat16"))
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                 help="activation dtype (autocast when it differs from "
                      "--param-dtype)")
  p.add_argument("--steps", type=int, default=20, help="timed steps")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--sparsity", type=float, default=0.9, help="BlockLLM")
  p.add_argument("--switch-every", type=int, default=50, help="BAdam")
  p.add_argument("--blockllm-src", type=Path, default=None)
  p.add_argument("--badam-src", type=Path, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", type=Path, default=Path("runs/torch_reference"))
  p.add_argument("--single", choices=METHODS, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def build_model(args, torch, device):
  import transformers
  layers, hidden, inter, heads, kv, vocab = common.MODEL_SIZES[args.size]
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
      num_hidden_layers=layers, num_attention_heads=heads,
      num_key_value_heads=kv, max_position_embeddings=4096,
      tie_word_embeddings=False, attn_implementation="eager")
  torch.manual_seed(args.seed)
  model = transformers.LlamaForCausalLM(config)
  return model.to(device=device, dtype=getattr(torch, args.param_dtype))


def build_optimizer(method, model, args, torch):
  if method == "adamw":
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  if method == "blockllm":
    if args.blockllm_src is None:
      raise SystemExit("--methods blockllm needs --blockllm-src (the folder "
                       "holding blockllm_torch/).")
    sys.path.insert(0, str(args.blockllm_src))
    from blockllm_torch.blockllm import BlockLLM, BlockLLMConfig
    return BlockLLM(model.named_parameters(),
                    BlockLLMConfig(lr=1e-4, sparsity_level=args.sparsity))
  if args.badam_src is None:
    raise SystemExit("--methods badam needs --badam-src (the folder holding "
                     "badam/, e.g. BAdam/src).")
  sys.path.insert(0, str(args.badam_src))
  from badam import BlockOptimizer
  base = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  # Embedding and head are blocks too, as in examples/benchmark.py's badam.
  return BlockOptimizer(base, list(model.named_parameters()),
                        switch_block_every=args.switch_every,
                        switch_mode="ascending", include_embedding=True,
                        include_lm_head=True, verbose=0)


def measure(method, args):
  """One method in this process: median step time and the CUDA peak."""
  import numpy as np
  import torch
  cuda = torch.cuda.is_available()  # CPU: a smoke run, no peak
  device = "cuda" if cuda else "cpu"
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  model = build_model(args, torch, device)
  optimizer = build_optimizer(method, model, args, torch)
  rng = np.random.default_rng(args.seed)
  autocast = args.dtype != args.param_dtype

  def step():
    tokens = torch.as_tensor(rng.integers(0, model.config.vocab_size,
                                          (args.batch, args.seq)), device=device)
    with torch.autocast(device, dtype=getattr(torch, args.dtype),
                        enabled=autocast):
      loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    if method == "blockllm":
      optimizer.set_loss(loss.item())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  if method == "badam":
    # Visit every block once so the peak covers the largest one.
    every = optimizer.switch_block_every
    optimizer.switch_block_every = 1
    for _ in range(optimizer.block_num):
      step()
    optimizer.switch_block_every = every
  seconds = []
  for t in range(args.warmup + args.steps):
    sync()
    begin = time.perf_counter()
    step().item()
    sync()
    if t >= args.warmup:
      seconds.append(time.perf_counter() - begin)
  step_s = float(np.median(seconds))
  return dict(method=method, size=args.size,
              params=sum(p.numel() for p in model.parameters()),
              step_ms=1e3 * step_s, tokens_per_s=args.batch * args.seq / step_s,
              peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
              torch=torch.__version__,
              device=torch.cuda.get_device_name() if cuda else "cpu")


def main(argv=None):
  args = parse_args(argv)
  if args.single:
    print(json.dumps(measure(args.single, args)))
    return None
  rows = []
  for method in common.tqdm(args.methods, desc="methods"):
    command = [sys.executable, __file__, "--single", method] + [
        a for a in (argv if argv is not None else sys.argv[1:])]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
      raise SystemExit(f"{method} failed:\n{out.stderr[-4000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(
      dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))
  adamw = next((r for r in rows if r["method"] == "adamw"), None)
  print(f"\n{rows[0]['device']}, torch {rows[0]['torch']}, {args.size}, batch "
        f"{args.batch} x seq {args.seq}, params {args.param_dtype}, "
        f"activations {args.dtype}")
  common.print_table(
      ["method", "step ms", "tokens/s", "÷ adamw time", "peak MB",
       "÷ adamw peak"],
      [[f"{r['method']} (PyTorch original)" if r["method"] != "adamw"
        else "torch.optim.AdamW", f"{r['step_ms']:.1f}",
        f"{r['tokens_per_s']:,.0f}",
        f"{r['step_ms'] / adamw['step_ms']:.2f}" if adamw else "",
        f"{r['peak_bytes'] / 1e6:,.0f}" if r["peak_bytes"] else "n/a",
        f"{r['peak_bytes'] / adamw['peak_bytes']:.2f}"
        if adamw and r["peak_bytes"] else ""]
       for r in rows])
  return rows


if __name__ == "__main__":
  main()
