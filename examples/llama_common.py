"""Pieces shared by the LLaMA example scripts.

Resumable training (orbax checkpoints of parameters, optimizer state and the
loss history), batches that depend only on (seed, step) so a resumed run sees
exactly the data an uninterrupted one would, a terminal table and loss plots.
"""

from __future__ import annotations

import copy
import os

# Must be set before transformers / datasets are imported, or a hub lookup
# stalls for ~20 s with no network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def step_rng(seed: int, step: int) -> np.random.Generator:
  """The random stream of one training step: same (seed, step), same batch."""
  return np.random.default_rng([seed, step])


def window_sampler(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
  """Random ``seq_len`` windows of ``tokens``; batch ``t`` depends only on
  (seed, t), so a resumed run sees the batches an uninterrupted one would."""
  if tokens.size <= seq_len:
    raise ValueError(f"The corpus has {tokens.size} tokens; a sequence length "
                     f"of {seq_len} needs more.")

  def batch_at(step):
    starts = step_rng(seed, step).integers(0, tokens.size - seq_len, batch_size)
    return (jnp.asarray(np.stack([tokens[s:s + seq_len] for s in starts])),)
  return batch_at


class TrainCheckpoints:
  """Orbax checkpoints of ``(params, opt_state)`` plus the loss history.

  Args:
    directory: where ``<step>/`` folders go (created if missing).
    every: save after every ``every`` steps (and after the last one).
    keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: Path, every: int, keep: int = 2):
    import orbax.checkpoint as ocp
    if every < 1:
      raise ValueError(f"--save-every must be >= 1, got {every}.")
    self._ocp = ocp
    self.every = every
    self.manager = ocp.CheckpointManager(
        Path(directory).resolve(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, train_state, history: dict):
    args = self._ocp.args
    self.manager.save(step, args=args.Composite(
        train_state=args.StandardSave(train_state),
        history=args.JsonSave(history)))

  def restore(self, step: int, like):
    """Restores the checkpoint of ``step`` into the structure of ``like``."""
    args = self._ocp.args
    # Restored with ``like``'s shardings: a sharded run resumes sharded.
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    restored = self.manager.restore(step, args=args.Composite(
        train_state=args.StandardRestore(abstract), history=args.JsonRestore()))
    return restored["train_state"], restored["history"]

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def train(step_fn: Callable, params, opt_state, batch_at: Callable[[int], tuple],
          steps: int, *, desc: str, checkpoints: Optional[TrainCheckpoints] = None,
          resume: bool = False, progress: bool = True,
          on_step: Optional[Callable[[int, float, object], None]] = None,
          extras: Optional[dict] = None):
  """Runs ``params, opt_state, loss = step_fn(params, opt_state, *batch_at(t))``.

  Args:
    step_fn: a jitted train step (may donate params and state).
    params, opt_state: the starting point (ignored when resuming).
    batch_at: step index -> tuple of batch arrays; must be deterministic.
    steps: total number of steps of the run.
    desc: progress-bar label.
    checkpoints: where to save every ``checkpoints.every`` steps.
    resume: continue from the latest checkpoint if there is one.
    progress: show a tqdm bar.
    on_step: optional ``(step, loss, params)`` callback, e.g. for periodic
      evaluation.
    extras: a JSON-able dict (string keys) saved with each checkpoint and
      refilled on resume, e.g. evaluation results.

  Returns:
    ``(params, opt_state, losses, step_seconds)`` where the lists cover the
    whole run, restored history included.
  """
  start, losses, seconds = 0, [], []
  if resume and checkpoints is not None and checkpoints.latest_step() is not None:
    start = checkpoints.latest_step()
    (params, opt_state), history = checkpoints.restore(start, (params, opt_state))
    losses, seconds = list(history["losses"]), list(history["seconds"])
    if extras is not None:
      extras.update(history.get("extras", {}))
    print(f"{desc}: resumed from step {start}")
  bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps,
             disable=not progress)
  try:
    for t in bar:
      batch = batch_at(t)
      begin = time.perf_counter()
      params, opt_state, loss = step_fn(params, opt_state, *batch)
      loss = float(loss)  # waits for the step to finish
      seconds.append(time.perf_counter() - begin)
      losses.append(loss)
      bar.set_postfix(loss=f"{loss:.3f}")
      if on_step is not None:
        on_step(t, loss, params)
      if checkpoints is not None and ((t + 1) % checkpoints.every == 0 or t + 1 == steps):
        # Copies: orbax serialises in the background while the lists grow.
        checkpoints.save(t + 1, (params, opt_state),
                         {"losses": list(losses), "seconds": list(seconds),
                          "extras": copy.deepcopy(extras or {})})
  finally:
    # Orbax writes in the background; an interrupted run still finishes
    # the checkpoint it started, so --resume finds it.
    if checkpoints is not None:
      checkpoints.manager.wait_until_finished()
  return params, opt_state, losses, seconds


def median_step_ms(seconds: Sequence[float]) -> float:
  """Median step time, leaving out the first fifth (compilation, warm-up)."""
  return 1e3 * float(np.median(seconds[len(seconds) // 5:]))


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]):
  """Prints an aligned plain-text table."""
  lines = [tuple(header)] + [tuple(r) for r in rows]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  for j, line in enumerate(lines):
    print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
    if j == 0:
      print("  ".join("-" * w for w in widths))


def markdown_table(header: Sequence[str],
                   rows: Sequence[Sequence[str]]) -> list:
  """The lines of a Markdown table."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(row) + " |" for row in rows])


def device_banner(details: str) -> str:
  """One line naming the device and jax version, then ``details``."""
  import jax
  return (f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {details}")


def smooth(values: Sequence[float], window: int) -> np.ndarray:
  """Trailing moving average (shorter at the start)."""
  values = np.asarray(values, np.float64)
  cumulative = np.concatenate([[0.0], np.cumsum(values)])
  ends = np.arange(1, len(values) + 1)
  starts = np.maximum(ends - window, 0)
  return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def plot_losses(curves: dict, path: Path, *, xlabel: str, ylabel: str,
                title: str = "", points: Optional[dict] = None, window: int = 20):
  """Saves a PNG of loss curves (raw, faint; moving average, solid).

  Args:
    curves: label -> per-step losses.
    path: PNG file to write.
    points: optional label -> (steps, values) drawn as markers (e.g. eval loss).
    window: moving-average window.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (label, losses) in enumerate(curves.items()):
    color = f"C{i}"
    ax.plot(losses, color=color, alpha=0.25, linewidth=0.8)
    ax.plot(smooth(losses, window), color=color, label=label)
  for i, (label, (steps, values)) in enumerate((points or {}).items()):
    ax.plot(steps, values, "o--", color=f"C{i + len(curves)}", label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_yscale("log")
  if title:
    ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_memory_bars(rows: Sequence[dict], path: Path):
  """Stacked bars (arguments, temporaries) of compiled train steps, one
  panel per model size; ``rows`` carry ``size``, ``method``, ``argument``
  and ``temp`` (bytes), in the order to draw."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sizes = list(dict.fromkeys(r["size"] for r in rows))
  fig, axes = plt.subplots(1, len(sizes), figsize=(4.5 * len(sizes), 4),
                           squeeze=False)
  for ax, size in zip(axes[0], sizes):
    by = [r for r in rows if r["size"] == size]
    arguments = [r["argument"] / 1e6 for r in by]
    names = [r["method"] for r in by]
    ax.bar(names, arguments, label="arguments (params, state, batch)")
    ax.bar(names, [r["temp"] / 1e6 for r in by], bottom=arguments,
           label="temporaries (gradients, activations)")
    ax.set_title(f"{size}: compiled train step")
    ax.set_ylabel("MB")
    ax.tick_params(axis="x", rotation=60)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def add_model_arguments(parser, *, hidden_size=128, layers=4):
  """The size flags of the built-in LLaMA, shared by the example scripts."""
  import argparse
  parser.add_argument("--hidden-size", type=int, default=hidden_size)
  parser.add_argument("--layers", type=int, default=layers)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv-heads", type=int, default=2)
  parser.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte",
                      help="raw UTF-8 bytes, or a byte-level BPE trained locally "
                           "on the corpus (saved as tokenizer.json)")
  parser.add_argument("--bpe-vocab", type=int, default=2048)
  parser.add_argument("--scan-layers", action=argparse.BooleanOptionalAction,
                      default=False,
                      help="run the decoder layers under nn.scan (parameters "
                           "stacked on a leading axis; the block optimizers "
                           "then get layer_axis=0)")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise each decoder layer in the backward "
                           "pass (see --remat-policy)")
  parser.add_argument("--remat-policy", default="nothing_saveable",
                      choices=("nothing_saveable", "dots_saveable",
                               "dots_with_no_batch_dims_saveable"),
                      help="what a rematerialised layer keeps")


def with_layout(args, settings, params=None):
  """``(settings, params)`` in the layer layout the flags ask for
  (--scan-layers stacks the layers of unrolled ``params``; --remat)."""
  import dataclasses
  from blockllm_jax.models import stack_layers
  if args.scan_layers and params is not None and not settings.scan_layers:
    params = stack_layers(params, settings.num_hidden_layers)
  settings = dataclasses.replace(
      settings, scan_layers=settings.scan_layers or args.scan_layers,
      remat=args.remat, remat_policy=args.remat_policy)
  return settings, params


def layer_axis_of(settings):
  """The block optimizers' ``layer_axis`` for our LLaMA's layout."""
  return 0 if settings.scan_layers else None


# Named sizes of the built-in LLaMA for the benchmarks:
# (layers, hidden, intermediate, heads, kv heads, vocab).
MODEL_SIZES = {
    "tiny": (2, 64, 128, 4, 2, 256),
    "cpu-4m": (4, 256, 688, 4, 2, 512),
    "cpu-13m": (8, 384, 1024, 6, 2, 1024),
    "cpu-37m": (12, 512, 1376, 8, 4, 2048),
    "gpu-350m": (24, 1024, 2816, 16, 8, 32000),
    "gpu-1b": (16, 2048, 5632, 32, 8, 32000),
    "llama-7b": (32, 4096, 11008, 32, 32, 32000),
}


def sized_settings(size: str, vocab_size: Optional[int] = None):
  """LlamaSettings of a named size; ``vocab_size`` overrides its vocabulary."""
  from blockllm_jax.models import LlamaSettings
  layers, hidden, inter, heads, kv, vocab = MODEL_SIZES[size]
  return LlamaSettings(vocab_size=vocab_size or vocab, hidden_size=hidden,
                       intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv,
                       max_position_embeddings=4096)


def llama_settings(args, vocab_size: int):
  """LlamaSettings of the built-in model from the size flags."""
  from blockllm_jax.models import LlamaSettings
  # SwiGLU width 8/3 * hidden, rounded down to a multiple of 8 as LLaMA does.
  return LlamaSettings(
      vocab_size=vocab_size, hidden_size=args.hidden_size,
      intermediate_size=int(args.hidden_size * 8 / 3 // 8 * 8),
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads)


def corpus_tokenizer(kind: str, corpus: str, cache_dir: Path, vocab_size: int):
  """A byte tokenizer, or a BPE trained on ``corpus`` (cached by content)."""
  from blockllm_jax import data
  if kind == "byte":
    return data.ByteTokenizer()
  import hashlib
  digest = hashlib.sha1(corpus.encode("utf-8")).hexdigest()[:12]
  folder = Path(cache_dir) / f"bpe_{vocab_size}_{digest}"
  if (folder / "tokenizer.json").exists():
    return data.load_tokenizer(folder)
  return data.train_bpe_tokenizer([corpus], vocab_size=vocab_size, save_dir=folder)
