"""Compile time of one train step against AdamW, over model depth.

For each depth, builds our LLaMA (default width 64) and compiles one jitted
train step per method on abstract shapes (``jax.jit(step).lower(...)
.compile()``), timing the CPU process time of lowering plus compiling (what
a user waits for before the first step; process time is less sensitive to
a busy machine than wall time) over ``--repeat`` compiles taken in rounds
over the methods. Each compile runs in a Python process of its own, as a
training script's first step does, after a trivial compile that starts the
backend: compiles one after another in one long process took longer (on
our 2-core VM the median of AdamW's 16-layer step 5.3-5.8 s there against
4.1-4.5 s in fresh processes, the lean BlockLLM step's 9.0-9.5 s against
7.6-7.9 s); single compiles vary by 10-40% either way. Reports their
median (what a run typically waits) and their minimum (the compile's own
work: a busy machine only adds to it), each with its ratio to AdamW's at
the same depth, the size of the optimized HLO and, per method, the slopes
of compile time over depth (seconds per layer, least squares) next to
AdamW's. ``results.json`` also holds every compile's time and the median
of the part spent before XLA (``lower_cpu_s``: tracing and lowering).

Methods: ``adamw`` (``optax.adamw``), ``blockllm`` / ``badam`` on
``jax.value_and_grad`` (the plain path), and ``blockllm-lean`` /
``badam-lean`` on :func:`blockllm_jax.lean_value_and_grad` (gradient- and
compute-lean).

Usage::

  python examples/compile_benchmark.py                   # 2 4 8 16 32 layers
  python examples/compile_benchmark.py --layers 2 8 --methods adamw blockllm
  python examples/compile_benchmark.py --scan-layers --remat \
      --out runs/compile_scanned

Writes ``results.json``, ``compile.md`` and ``compile.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_common  # noqa: E402

import blockllm_jax as bl  # noqa: E402
from blockllm_jax.models import LlamaForCausalLM  # noqa: E402
from blockllm_jax.models import LlamaSettings  # noqa: E402
from blockllm_jax.models import causal_lm_loss  # noqa: E402

METHODS = ("adamw", "blockllm", "blockllm-lean", "badam", "badam-lean")
# The statistics of a method's repeated compiles that the tables report.
STATISTICS = ("compile_cpu_s", "compile_cpu_min_s")  # median, minimum


def train_step(method: str, model):
  """(optimizer, step) of one method; the step takes (params, state, tokens).

  A scanned model (``settings.scan_layers``) gets ``layer_axis=0``: each
  layer of a stacked leaf is a unit of the block optimizers."""
  layer_axis = 0 if model.settings.scan_layers else None
  def loss_fn(params, tokens):
    return causal_lm_loss(model.apply({"params": params}, tokens), tokens)

  if method == "adamw":
    tx = optax.adamw(1e-4)
  elif method.startswith("blockllm"):
    tx = bl.blockllm(1e-4, sparsity=0.9, layer_axis=layer_axis)
  else:
    tx = bl.badam(1e-4, switch_every=50, layer_axis=layer_axis)
  if method.endswith("-lean"):
    grad_fn = bl.lean_value_and_grad(loss_fn)
  else:
    grad_fn = lambda p, s, t: jax.value_and_grad(loss_fn)(p, t)

  def step(params, opt_state, tokens):
    loss, grads = grad_fn(params, opt_state, tokens)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, step


def build(method: str, layers: int, args):
  """A method's jitted step and the abstract arguments it compiles for."""
  settings = LlamaSettings(
      vocab_size=args.vocab, hidden_size=args.width,
      intermediate_size=2 * args.width, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2,
      scan_layers=args.scan_layers, remat=args.remat)
  model = LlamaForCausalLM(settings)
  tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
  params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0),
                         jnp.zeros(tokens.shape, tokens.dtype))["params"])
  tx, step = train_step(method, model)
  opt_state = jax.eval_shape(tx.init, params)
  return step, (params, opt_state, tokens)


def measure_one(method: str, layers: int, args) -> dict:
  """One compile of ``method``'s step at ``layers``, in this process:
  ``{"cpu": s, "wall": s, "lower_cpu": s, "hlo_lines": n}`` (``lower_cpu``:
  the part before XLA, tracing and lowering to StableHLO).

  A trivial compile first starts the backend and the code generator, so
  that the clock holds this step's lowering and compile only."""
  step, arguments = build(method, layers, args)
  jax.jit(lambda x: x + 1).lower(jnp.zeros([], jnp.float32)).compile()
  gc.collect()
  wall, cpu = time.perf_counter(), time.process_time()
  lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*arguments)
  lower_cpu = time.process_time() - cpu
  compiled = lowered.compile()
  cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
  return dict(cpu=cpu, wall=wall, lower_cpu=lower_cpu,
              hlo_lines=len(compiled.as_text().splitlines()))


# The options that set the model, defined once: the sweep's parser takes
# them, and each worker process gets the same values back as flags.
MODEL_OPTIONS = {
    "--width": dict(type=int, default=64),
    "--vocab": dict(type=int, default=256),
    "--batch": dict(type=int, default=1),
    "--seq": dict(type=int, default=16),
    "--scan-layers": dict(action="store_true",
                          help="decoder layers under nn.scan (block "
                               "optimizers with layer_axis=0)"),
    "--remat": dict(action="store_true",
                    help="rematerialise each decoder layer"),
}


def add_model_options(parser: argparse.ArgumentParser) -> None:
  """Adds :data:`MODEL_OPTIONS` to ``parser``."""
  for flag, options in MODEL_OPTIONS.items():
    parser.add_argument(flag, **options)


def model_flags(args) -> list:
  """The command-line flags that set the model (passed to each worker)."""
  flags = []
  for flag, options in MODEL_OPTIONS.items():
    value = getattr(args, flag[2:].replace("-", "_"))
    if options.get("action") == "store_true":
      flags += [flag] if value else []
    else:
      flags += [flag, str(value)]
  return flags


def measure_in_fresh_process(method: str, layers: int, args) -> dict:
  """:func:`measure_one` in a new Python process (this script with
  ``--measure-one``)."""
  command = [sys.executable, str(Path(__file__).resolve()), "--measure-one",
             method, str(layers), *model_flags(args)]
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(
        f"compiling {method} at {layers} layers failed (exit "
        f"{done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def measure_depth(layers: int, args, progress) -> list:
  """One row per method at ``layers``: the median and the minimum of
  ``--repeat`` compiles, each in a fresh process.

  The repeats go round the methods (adamw, blockllm, ..., adamw, ...), so
  that a stretch of a slow machine falls on every method alike instead of
  on one method's consecutive compiles."""
  runs = {m: [] for m in args.methods}
  for _ in range(args.repeat):
    for method in args.methods:
      runs[method].append(measure_in_fresh_process(method, layers, args))
      progress.update()

  def each(method, key):
    return [run[key] for run in runs[method]]

  return [dict(method=m, layers=layers,
               compile_cpu_s=float(np.median(each(m, "cpu"))),
               compile_cpu_min_s=float(np.min(each(m, "cpu"))),
               compile_wall_s=float(np.median(each(m, "wall"))),
               lower_cpu_s=float(np.median(each(m, "lower_cpu"))),
               compile_cpu_all=each(m, "cpu"),
               # The same program every repeat.
               hlo_lines=runs[m][0]["hlo_lines"])
          for m in args.methods]


def slope(rows, method, key="compile_cpu_s"):
  """Seconds of compile (CPU; ``key``: median or minimum) per layer, least
  squares over the depths."""
  points = [(r["layers"], r[key]) for r in rows if r["method"] == method]
  if len(points) < 2:
    return float("nan")
  x, y = np.asarray(points, float).T
  return float(np.polyfit(x, y, 1)[0])


def main(argv=None) -> list:
  """Runs the sweep (``argv``: command-line arguments, default
  ``sys.argv[1:]``) and returns its rows."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, nargs="+",
                      default=[2, 4, 8, 16, 32])
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=METHODS)
  add_model_options(parser)
  parser.add_argument("--repeat", type=int, default=3,
                      help="compiles per (depth, method), each in a fresh "
                           "process; their median and minimum are reported")
  parser.add_argument("--out", type=Path, default=Path("runs/compile"))
  # A worker: one compile in this process, its result as JSON on stdout.
  parser.add_argument("--measure-one", nargs=2, metavar=("METHOD", "LAYERS"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.measure_one:
    method, layers = args.measure_one
    if method not in METHODS:
      parser.error(f"--measure-one: unknown method {method!r}")
    print(json.dumps(measure_one(method, int(layers), args)))
    return []
  if args.repeat < 1:
    parser.error(f"--repeat must be >= 1; got {args.repeat}")
  if min(args.layers) < 1:
    parser.error(f"--layers must be >= 1; got {args.layers}")
  if "adamw" not in args.methods:
    args.methods = ["adamw", *args.methods]
  args.out.mkdir(parents=True, exist_ok=True)
  print(llama_common.device_banner(
      f"width {args.width}, batch {args.batch} x seq {args.seq}"))
  rows = []
  progress = llama_common.tqdm(
      total=len(args.layers) * len(args.methods) * args.repeat,
      desc="compile")
  for layers in args.layers:
    rows += measure_depth(layers, args, progress)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
  progress.close()

  adamw = {r["layers"]: r for r in rows if r["method"] == "adamw"}
  header = ["layers", "method", "median s (CPU)", "÷ adamw", "min s (CPU)",
            "÷ adamw", "HLO lines", "÷ adamw"]
  table = []
  for r in rows:
    ref = adamw[r["layers"]]
    row = [str(r["layers"]), r["method"]]
    for key in STATISTICS:
      row += [f"{r[key]:.1f}", f"{r[key] / ref[key]:.2f}"]
    table.append(row + [str(r["hlo_lines"]),
                        f"{r['hlo_lines'] / ref['hlo_lines']:.2f}"])
  llama_common.print_table(header, table)
  markdown = llama_common.markdown_table(header, table) + [""]
  if len(set(args.layers)) > 1:
    base = {key: slope(rows, "adamw", key) for key in STATISTICS}
    slopes = []
    for m in args.methods:
      row = [m]
      for key in STATISTICS:
        per_layer = slope(rows, m, key)
        row += [f"{per_layer:.3f}", f"{per_layer / base[key]:.2f}"]
      slopes.append(row)
    slope_header = ["method", "median s per layer", "÷ adamw",
                    "min s per layer", "÷ adamw"]
    llama_common.print_table(slope_header, slopes)
    markdown += llama_common.markdown_table(slope_header, slopes)
  else:
    print("(slopes over depth need two or more --layers)")
  (args.out / "compile.md").write_text("\n".join(markdown) + "\n")
  plot(rows, args)
  print(f"wrote {args.out}/results.json, compile.md, compile.png")
  return rows


def plot(rows, args):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in args.methods:
    mine = sorted((r["layers"], r["compile_cpu_s"], r["compile_cpu_min_s"])
                  for r in rows if r["method"] == method)
    layers, median, least = zip(*mine)
    line, = ax.plot(layers, median, marker="o", label=method)
    ax.plot(layers, least, linestyle="--", linewidth=0.8,
            color=line.get_color())
  ax.set_xlabel("decoder layers")
  ax.set_ylabel("compile time, CPU s (median; dashed: minimum)")
  layout = " scanned" if args.scan_layers else ""
  layout += " remat" if args.remat else ""
  ax.set_title(f"train-step compile time (width {args.width}{layout})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.out / "compile.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
