"""Memory and speed of lean train steps against AdamW and a static freeze.

For each LLaMA size, compiles one train step per method and reads XLA's
memory analysis (arguments, temporaries, total; works on CPU), then times
the step (median after warm-up, same process, ratio to AdamW). Methods:

- ``adamw``: ``optax.adamw`` on the full gradient.
- ``static``: AdamW on a fixed set of leaves holding as many coordinates as
  BlockLLM's budget, the others under ``stop_gradient``: the floor a dynamic
  selection can approach (XLA drops the frozen gradients).
- ``static-block``: the same for BAdam: AdamW on the leaves of its first
  block (a decoder layer), the others frozen: BAdam's floor.
- ``blockllm``: BlockLLM (sparsity 0.9) on ``jax.value_and_grad`` (tier A).
- ``blockllm-lean``: ``lean_value_and_grad(..., compute_lean=False)`` (B).
- ``blockllm-compute-lean``: ``lean_value_and_grad(...)`` (B and C).
- ``badam`` / ``badam-compute-lean``: BAdam, plain and lean.

``--remat-policy`` is passed to ``lean_value_and_grad`` (``auto``:
``no-batch-dots`` off CPU unless the layers are under ``--scan-layers`` /
``--remat``, else none).

With a GPU, ``--peak`` also runs every method in a fresh process and reports
``peak_bytes_in_use`` (the peak cannot be reset within a process).

Usage::

  python examples/lean_benchmark.py                      # CPU sizes
  python examples/lean_benchmark.py --sizes gpu-350m --dtype bfloat16 --peak
  python examples/lean_benchmark.py --sizes gpu-350m --dtype bfloat16 --peak \
      --methods blockllm blockllm-compute-lean --remat-policy none
  python examples/lean_benchmark.py --scan-layers --remat \
      --methods adamw blockllm blockllm-compute-lean badam badam-compute-lean

Writes ``results.json``, ``memory.md`` and ``memory.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_common  # noqa: E402

import blockllm_jax as bl  # noqa: E402
from blockllm_jax.models import LlamaForCausalLM  # noqa: E402
from blockllm_jax.models import causal_lm_loss  # noqa: E402

SIZES = tuple(s for s in llama_common.MODEL_SIZES if s != "tiny")
METHODS = ("adamw", "static", "static-block", "blockllm", "blockllm-lean",
           "blockllm-compute-lean", "badam", "badam-compute-lean")
SPARSITY = 0.9


def static_mask(params):
  """Leaves in flattening order while they fit BlockLLM's budget."""
  layout = bl._layout.build_layout(params)
  budget = math.ceil((1 - SPARSITY) * layout.num_candidate_coordinates)
  capacity = max(budget, max(layout.sizes))
  chosen, used = set(), 0
  for index, size in zip(layout.eligible_index, layout.sizes):
    if used + size <= capacity:
      chosen.add(index)
      used += size
  flat, treedef = jax.tree_util.tree_flatten(params)
  return treedef.unflatten([i in chosen for i in range(len(flat))])


def block_mask(params):
  """The leaves of BAdam's first block (default blocks: one decoder layer)."""
  _, paths = bl.block_partition(params)[0]
  chosen = set(paths)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bl._layout.path_to_str(path) in chosen, params)


# `--remat-policy` names: `lean_value_and_grad`'s `remat_policy`.
REMAT_POLICIES = {
    "auto": "auto", "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "no-batch-dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def build(method: str, model, params, remat_policy: str = "auto"):
  """(optimizer, train step) of one method."""
  def loss_fn(params, tokens):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens)

  def with_grads(tx, grad_fn):
    def step(params, opt_state, tokens):
      loss, grads = grad_fn(params, opt_state, tokens)
      updates, opt_state = tx.update(grads, opt_state, params, value=loss)
      return optax.apply_updates(params, updates), opt_state, loss
    return tx, step

  plain = lambda p, s, t: jax.value_and_grad(loss_fn)(p, t)
  if method == "adamw":
    return with_grads(optax.adamw(1e-4), plain)
  if method.startswith("static"):
    mask = static_mask(params) if method == "static" else block_mask(params)
    tx = optax.masked(optax.adamw(1e-4), mask)

    def frozen_loss(params, tokens):
      params = jax.tree.map(
          lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params)
      return loss_fn(params, tokens)
    return with_grads(tx, lambda p, s, t: jax.value_and_grad(frozen_loss)(p, t))
  base, _, variant = method.partition("-")
  # A scanned model's stacked leaves: one unit per layer.
  layer_axis = 0 if model.settings.scan_layers else None
  tx = (bl.blockllm(1e-4, sparsity=SPARSITY, layer_axis=layer_axis)
        if base == "blockllm"
        else bl.badam(1e-4, switch_every=50, layer_axis=layer_axis))
  if not variant:
    return with_grads(tx, plain)
  return with_grads(tx, bl.lean_value_and_grad(
      loss_fn, compute_lean=variant == "compute-lean",
      remat_policy=REMAT_POLICIES[remat_policy]))


def measure(method, size, args, *, timed=True):
  import dataclasses
  settings = dataclasses.replace(llama_common.sized_settings(size),
                                 scan_layers=args.scan_layers,
                                 remat=args.remat)
  dtype = jnp.dtype(args.dtype)
  model = LlamaForCausalLM(settings, dtype=dtype)
  tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens)["params"]
  tx, step = build(method, model, params, args.remat_policy)
  opt_state = tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt_state, tokens).compile()
  compile_s = time.perf_counter() - start
  memory = bl.CompiledMemory.of(compiled)
  row = dict(method=method, size=size,
             params=int(sum(p.size for p in jax.tree.leaves(params))),
             state_bytes=bl.state_bytes(opt_state), argument=memory.argument,
             output=memory.output, temp=memory.temp, alias=memory.alias,
             total=memory.total, compile_s=compile_s)
  if timed:
    rng = np.random.default_rng(0)
    seconds = []
    for t in range(args.warmup + args.steps):
      batch = jnp.asarray(rng.integers(0, settings.vocab_size,
                                       (args.batch, args.seq)), jnp.int32)
      begin = time.perf_counter()
      params, opt_state, loss = compiled(params, opt_state, batch)
      loss.block_until_ready()
      if t >= args.warmup:
        seconds.append(time.perf_counter() - begin)
    row["step_ms"] = llama_common.median_step_ms(seconds)
    stats = jax.devices()[0].memory_stats() or {}
    row["peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
  return row


def fresh_process_row(method, size, args):
  """``measure`` of one method alone in a new process, so the GPU's
  ``peak_bytes_in_use`` is that method's own peak."""
  command = [sys.executable, __file__, *sys.argv[1:], "--single", method,
             "--sizes", size]
  out = subprocess.run(command, capture_output=True, text=True)
  if out.returncode:
    raise SystemExit(f"{method} at {size} failed:\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def mb(x):
  return "n/a" if x is None else f"{x / 1e6:.2f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", nargs="+", default=["cpu-4m", "cpu-13m",
                                                     "cpu-37m"],
                      choices=sorted(SIZES))
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=METHODS)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--dtype", default="float32",
                      help="activation dtype (parameters stay float32)")
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps per method (0: memory only)")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak", action="store_true",
                      help="GPU: peak_bytes_in_use in a fresh process each")
  parser.add_argument("--scan-layers", action="store_true",
                      help="decoder layers under nn.scan (block optimizers "
                           "with layer_axis=0; no static freeze)")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise each decoder layer")
  parser.add_argument("--remat-policy", choices=list(REMAT_POLICIES),
                      default="auto",
                      help="lean_value_and_grad's remat_policy (lean rows)")
  parser.add_argument("--single", choices=METHODS, help=argparse.SUPPRESS)
  parser.add_argument("--out", type=Path, default=Path("runs/lean_benchmark"))
  args = parser.parse_args()
  if args.scan_layers and {"static", "static-block"} & set(args.methods):
    parser.error("--scan-layers: no static freeze (it cannot mask single "
                 "layers of a stacked leaf).")

  if args.single:
    print(json.dumps(measure(args.single, args.sizes[0], args)))
    return
  args.out.mkdir(parents=True, exist_ok=True)
  print(llama_common.device_banner(
      f"batch {args.batch} x seq {args.seq}, activations {args.dtype}"))
  rows = []
  jobs = [(s, m) for s in args.sizes for m in args.methods]
  for size, method in llama_common.tqdm(jobs, desc="compile + time"):
    fresh = args.peak and jax.default_backend() == "gpu"
    rows.append(fresh_process_row(method, size, args) if fresh
                else measure(method, size, args, timed=args.steps > 0))
    jax.clear_caches()
  (args.out / "results.json").write_text(json.dumps(rows, indent=1))

  header = ["size", "params", "method", "state MB", "arguments MB",
            "temporaries MB", "total MB", "÷ floor", "÷ adamw", "step ms",
            "÷ adamw time", "GPU peak MB", "compile s"]
  table = []
  for size in args.sizes:
    by = {r["method"]: r for r in rows if r["size"] == size}
    for method in args.methods:
      r = by[method]
      ratio = lambda key, ref: (f"{r[key] / by[ref][key]:.2f}"
                                if ref in by and by[ref].get(key) else "")
      table.append([size, f"{r['params'] / 1e6:.1f}M", method,
                    mb(r["state_bytes"]), mb(r["argument"]), mb(r["temp"]),
                    # The floor: a static freeze of as much (BlockLLM) or
                    # of one block (BAdam).
                    mb(r["total"]), ratio("total", "static-block"
                                          if method.startswith(("badam",
                                                                "static-block"))
                                          else "static"),
                    ratio("total", "adamw"),
                    f"{r['step_ms']:.1f}" if "step_ms" in r else "",
                    ratio("step_ms", "adamw"), mb(r.get("peak_bytes_in_use")),
                    f"{r['compile_s']:.1f}"])
  llama_common.print_table(header, table)
  markdown = llama_common.markdown_table(header, table)
  (args.out / "memory.md").write_text("\n".join(markdown) + "\n")
  plot(rows, args)
  print(f"wrote {args.out}/results.json, memory.md, memory.png")


def plot(rows, args):
  order = {m: i for i, m in enumerate(args.methods)}
  common_rows = sorted((r for r in rows if r["method"] in order),
                       key=lambda r: (args.sizes.index(r["size"]),
                                      order[r["method"]]))
  llama_common.plot_memory_bars(common_rows, args.out / "memory.png")


if __name__ == "__main__":
  main()
