"""Memory estimator: what a fine-tuning step needs, before renting a GPU.

Run as ``python -m blockllm_jax.memory``::

  python -m blockllm_jax.memory --preset llama-7b --method blockllm-lean \\
      --sparsity 0.95 --moment-dtype bfloat16 --batch 1 --seq 512 --remat
  python -m blockllm_jax.memory --gguf model.gguf --method all
  python -m blockllm_jax.memory --model-dir path/to/hf_checkpoint --method all

For each method it builds the *exact* train step (our LLaMA with the
checkpoint's architecture, the optimizer as ``blockllm`` / ``badam`` /
``bread`` / ``optax`` build it, lean or plain) on abstract shapes, so nothing
is allocated, and reports:

- **weights**, **optimizer state**: exact (``jax.eval_shape`` of the
  parameters and of ``tx.init``);
- **gradient**: what the step must hold of the gradient at its peak, by the
  method's memory model: the whole tree for a plain step (an upper bound:
  a compiler may fuse some leaves' updates into the backward pass), the
  adapters for LoRA, and for a lean step the largest eligible leaf's
  gradient (each is folded into the moments as it arrives, also inside
  ``nn.remat``);
- **activations**: what our LLaMA saves for its backward pass, counted
  tensor by tensor (:func:`activation_bytes`; with ``--remat`` the layer
  inputs plus one layer being recomputed);
- **XLA**: the compiled step's memory analysis (arguments + outputs +
  temporaries - aliased, parameters and state donated) where that
  instrument is trustworthy: on a GPU the exact step; on CPU only in
  float32, because XLA:CPU runs bfloat16 matmuls in float32 and keeps
  float32 copies of weight-shaped arrays. For bfloat16 on CPU it compiles
  the step's float32 twin instead and labels it so (the model's figures
  are then for the requested dtype, XLA's for float32);
- which of 24 / 40 / 80 GB cards hold the step (:data:`CARD_GIB`): the model
  total, or XLA's figure where it measured the requested dtype, must stay
  under :data:`USABLE_FRACTION` of the card's memory.

The model is ours (the Flax LLaMA of :mod:`blockllm_jax.models`); a user's
own model differs in its activations, not in weights, state or gradient.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

from blockllm_jax import _badam
from blockllm_jax import _blockllm
from blockllm_jax import _bread
from blockllm_jax import _layout
from blockllm_jax import _lean
from blockllm_jax import _memory
from blockllm_jax import models

METHODS = ("adamw", "lora", "blockllm", "blockllm-lean", "badam",
           "badam-lean", "bread-sgd")
# Card sizes as sold (24 GB RTX 3090/4090, A100 40 GB, A100/H100 80 GB): their
# memory in GiB, of which a step may use USABLE_FRACTION (the CUDA context,
# XLA's allocator and fragmentation take the rest).
CARD_GIB = (24, 40, 80)
USABLE_FRACTION = 0.95
GIB = 1024 ** 3

# Named architectures (HF config values); any other comes from --gguf or
# --model-dir.
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, max_position_embeddings=2048),
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, max_position_embeddings=4096),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                      num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, max_position_embeddings=4096),
}


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """What the estimated train step does (everything but the architecture).

  Attributes:
    method: one of :data:`METHODS`.
    batch: sequences per step.
    seq: tokens per sequence.
    param_dtype: weights' dtype (e.g. ``"bfloat16"``).
    dtype: activations' dtype; None: the weights'.
    sparsity: BlockLLM's sparsity.
    moment_dtype: the block optimizers' moment dtype.
    lora_rank: LoRA's rank (every projection).
    train_embeddings: the block optimizers may also train embeddings / head.
  """

  method: str = "blockllm-lean"
  batch: int = 1
  seq: int = 512
  param_dtype: str = "bfloat16"
  dtype: Optional[str] = None
  sparsity: float = 0.9
  moment_dtype: str = "float32"
  lora_rank: int = 8
  train_embeddings: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"`method` must be one of {METHODS}; got {self.method!r}.")
    for name in ("batch", "seq", "lora_rank"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"`sparsity` must be in [0, 1); got {self.sparsity}.")
    for name in ("param_dtype", "dtype", "moment_dtype"):
      value = getattr(self, name)
      if value is not None and not jnp.issubdtype(jnp.dtype(value), jnp.floating):
        raise ValueError(f"`{name}` must be a float dtype; got {value!r}.")

  @property
  def compute_dtype(self) -> str:
    return self.dtype or self.param_dtype


class MemoryEstimate(NamedTuple):
  """One method's memory, in bytes (see the module doc for each part)."""

  method: str
  num_params: int  # trainable + frozen parameters (LoRA adapters included)
  weights: int
  state: int  # optimizer state
  gradient: int  # gradient held at the step's peak (method's memory model)
  activations: int  # saved for the backward pass (our LLaMA, counted)
  xla: Optional[_memory.CompiledMemory]  # None: not compiled
  instrument: str  # what measured ``xla`` (backend and dtype)
  xla_is_exact: bool  # ``xla`` compiled the requested dtypes on a trusted backend

  @property
  def total(self) -> int:
    """The memory model's total: weights + state + gradient + activations."""
    return self.weights + self.state + self.gradient + self.activations

  @property
  def peak(self) -> int:
    """XLA's figure where it is exact, else the memory model's total."""
    return self.xla.total if self.xla is not None and self.xla_is_exact else self.total

  def fits(self, card_gib: float) -> bool:
    """Whether the step fits a card of ``card_gib`` GiB (see ``USABLE_FRACTION``)."""
    return self.peak <= USABLE_FRACTION * card_gib * GIB


def settings_for(preset: Optional[str] = None, *, gguf: Optional[Path] = None,
                 model_dir: Optional[Path] = None, scan_layers: bool = False,
                 remat: bool = False,
                 remat_policy: str = "nothing_saveable") -> models.LlamaSettings:
  """The architecture of a preset, a GGUF file's metadata, or an HF
  checkpoint's ``config.json`` (no weights are read), with the layout asked.

  Raises:
    ValueError: unless exactly one source is given, or for an unknown preset.
  """
  given = [x is not None for x in (preset, gguf, model_dir)]
  if sum(given) != 1:
    raise ValueError("Give exactly one of `preset`, `gguf` and `model_dir`.")
  layout = dict(scan_layers=scan_layers, remat=remat, remat_policy=remat_policy)
  if preset is not None:
    if preset not in PRESETS:
      raise ValueError(f"`preset` must be one of {sorted(PRESETS)}; got {preset!r}.")
    return models.LlamaSettings(**PRESETS[preset], **layout)
  if gguf is not None:
    from blockllm_jax.models import _gguf
    return _gguf.settings_from_gguf(_gguf.open_gguf(gguf), gguf, **layout)
  import json
  config = Path(model_dir) / "config.json"
  if not config.is_file():
    raise ValueError(f"`model_dir` {model_dir} has no config.json.")
  return models.settings_from_hf_config(json.loads(config.read_text()), **layout)


def activation_bytes(settings: models.LlamaSettings, batch: int, seq: int,
                     dtype: Any) -> int:
  """Bytes our LLaMA keeps for its backward pass (counted, not compiled).

  Per decoder layer, in the activation dtype ``c`` unless noted: the two
  RMSNorms' inputs and outputs (4 ``bsh``), q and k before and after the
  rotary embedding, v, and k / v repeated to every head (``3 bsh + 4 bsk``
  with ``k`` the key/value width), the float32 softmax output and its
  ``c`` copy (``(4 + c) b n s^2``), the attention output (``bsh``), and the
  MLP's gate, up and product (``3 bsf``). Rematerialised layers keep only
  their input (``bsh``) and recompute one layer at a time; a remat policy
  that saves matmul outputs keeps those too. The head adds the final norm
  and three float32 ``b s V`` arrays (logits, log-softmax, their gradient).

  Args:
    settings: the architecture (``remat`` / ``remat_policy`` are read).
    batch, seq: the step's tokens.
    dtype: the activation dtype.

  Returns:
    Bytes (an estimate: XLA may fuse or keep some of these).
  """
  s, c = settings, jnp.dtype(dtype).itemsize
  bs, h, f = batch * seq, s.hidden_size, s.intermediate_size
  heads, kv = s.num_attention_heads, s.num_key_value_heads * s.head_dim
  q = heads * s.head_dim
  attention_probs = (4 + c) * batch * heads * seq * seq
  # Norms 4h; q, k before / after rotary and v 2q + 3kv; k, v repeated to
  # every head 2q; attention output q; MLP 3f.
  layer = c * bs * (4 * h + 5 * q + 3 * kv + 3 * f) + attention_probs
  if s.remat:
    kept = c * bs * h
    if s.remat_policy != "nothing_saveable":
      # Matmul outputs: q, k, v, o, gate, up, down and the two attention
      # products (scores in float32).
      kept += c * bs * (q + 2 * kv + 2 * h + 2 * f) + c * bs * q
      kept += 4 * batch * heads * seq * seq
    layers = s.num_hidden_layers * kept + layer
  else:
    layers = s.num_hidden_layers * layer
  head = 2 * c * bs * h + 3 * 4 * bs * s.vocab_size
  return int(layers + head)


def held_gradient_bytes(method: str, params, *,
                        train_embeddings: bool = False,
                        layer_axis=None) -> int:
  """The gradient a method's step holds at its peak (the memory model).

  Args:
    method: one of :data:`METHODS`.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    train_embeddings: the block optimizers may train embeddings / head.
    layer_axis: of a scanned model's stacked leaves (as the optimizers
      take it): a lean step holds one layer's slice of them at a time.

  Returns:
    Bytes: the whole gradient for a plain step, the adapters' for LoRA, the
    largest eligible unit's for a lean step (a leaf, or one layer of a
    stacked leaf; with or without ``nn.remat``: compute-lean takes Dense
    layers over inside their checkpoints and scans).
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  nbytes = lambda x: int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
  if method == "lora":
    return sum(nbytes(x) for path, x in flat if models.is_lora_path(path))
  if method.endswith("-lean"):
    layout = _layout.build_layout(
        params, (lambda path, leaf: True) if train_embeddings else None,
        layer_axis)
    largest = max((size * jnp.dtype(dtype).itemsize for size, dtype in
                   zip(layout.sizes, layout.dtypes)), default=0)
    # Compute-lean: each selected gradient is folded into the moments as
    # it arrives; one is being written at a time.
    return largest
  return sum(nbytes(x) for _, x in flat)


def build_step(settings: models.LlamaSettings, config: StepConfig,
               learning_rate: float = 1e-5):
  """``(step, params, state, tokens)``: the method's train step and abstract
  arguments (``jax.ShapeDtypeStruct`` trees; nothing is allocated).

  ``step(params, state, tokens) -> (params, state, loss)`` is what a training
  loop jits with ``donate_argnums=(0, 1)``.
  """
  if config.method == "lora":
    settings = dataclasses.replace(settings, lora_rank=config.lora_rank)
  model = models.LlamaForCausalLM(settings, dtype=jnp.dtype(config.compute_dtype),
                                  param_dtype=jnp.dtype(config.param_dtype))
  tokens = jax.ShapeDtypeStruct((config.batch, config.seq), jnp.int32)
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tx = _optimizer(settings, config, params, learning_rate)
  state = jax.eval_shape(tx.init, params)

  def loss_fn(params, tokens):
    return models.causal_lm_loss(model.apply({"params": params}, tokens), tokens)

  lean = config.method.endswith("-lean")
  grad_fn = (_lean.lean_value_and_grad(loss_fn) if lean else
             lambda params, state, tokens: jax.value_and_grad(loss_fn)(params, tokens))

  def step(params, state, tokens):
    loss, grads = grad_fn(params, state, tokens)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state, loss

  return step, params, state, tokens


def _optimizer(settings, config: StepConfig, params, learning_rate):
  method = config.method.removesuffix("-lean")
  layer_axis = 0 if settings.scan_layers else None
  if method == "adamw":
    return optax.adamw(learning_rate)
  if method == "lora":
    labels = jax.tree.map(lambda a: "adapter" if a else "frozen",
                          models.lora_mask(params))
    return optax.multi_transform({"adapter": optax.adamw(learning_rate),
                                  "frozen": optax.set_to_zero()}, labels)
  if method == "blockllm":
    return _blockllm.blockllm(
        learning_rate, sparsity=config.sparsity, moment_dtype=config.moment_dtype,
        eligible=(lambda p, x: True) if config.train_embeddings else None,
        layer_axis=layer_axis)
  blocks = dict(include_embedding=config.train_embeddings,
                include_head=config.train_embeddings,
                moment_dtype=config.moment_dtype, layer_axis=layer_axis)
  if method == "badam":
    return _badam.badam(learning_rate, **blocks)
  return _bread.bread(learning_rate, correction="sgd", **blocks)


def estimate(settings: models.LlamaSettings, config: StepConfig, *,
             compile: bool = True) -> MemoryEstimate:
  """Estimates one method's train-step memory.

  Args:
    settings: the architecture and layout (see :func:`settings_for`).
    config: the step.
    compile: also compile the step (abstract shapes) for XLA's figure.
      On CPU with non-float32 dtypes the float32 twin is compiled.

  Returns:
    A :class:`MemoryEstimate`.

  Example:
    >>> s = settings_for("llama-7b", remat=True)
    >>> e = estimate(s, StepConfig("blockllm-lean", seq=512), compile=False)
    >>> e.fits(24)
  """
  step, params, state, _ = build_step(settings, config)
  leaves = jax.tree.leaves(params)
  result = MemoryEstimate(
      method=config.method, num_params=int(sum(np.prod(x.shape) for x in leaves)),
      weights=_memory.state_bytes(params), state=_memory.state_bytes(state),
      gradient=held_gradient_bytes(config.method, params,
                                   train_embeddings=config.train_embeddings,
                                   layer_axis=0 if settings.scan_layers
                                   else None),
      activations=activation_bytes(settings, config.batch, config.seq,
                                   config.compute_dtype),
      xla=None, instrument="not compiled", xla_is_exact=False)
  if not compile:
    return result
  backend = jax.default_backend()
  all_f32 = all(jnp.dtype(d) == jnp.float32 for d in (
      config.param_dtype, config.compute_dtype, config.moment_dtype))
  exact = backend != "cpu" or all_f32
  measured = config
  if not exact:
    measured = dataclasses.replace(config, param_dtype="float32", dtype=None,
                                   moment_dtype="float32")
  twin_step, params, state, tokens = build_step(settings, measured)
  memory = _memory.compiled_memory(twin_step, params, state, tokens,
                                   donate_argnums=(0, 1))
  device = "CPU" if backend == "cpu" else jax.devices()[0].device_kind
  instrument = (f"XLA:{device}" if exact else
                f"XLA:{device}, float32 twin (bfloat16 on XLA:CPU is not a GPU's)")
  return result._replace(xla=memory, instrument=instrument, xla_is_exact=exact)


def _gb(x: Optional[int]) -> str:
  return "-" if x is None else f"{x / GIB:.2f}"


def format_table(estimates: Sequence[MemoryEstimate]) -> str:
  """A plain-text table (GiB) of :func:`estimate` results."""
  header = ("method", "params", "weights", "state", "gradient", "activations",
            "model total", "XLA", "fits (GB)")
  rows = []
  for e in estimates:
    fits = ", ".join(str(g) for g in CARD_GIB if e.fits(g)) or "none"
    rows.append((e.method, f"{e.num_params / 1e9:.2f}B", _gb(e.weights),
                 _gb(e.state), _gb(e.gradient), _gb(e.activations), _gb(e.total),
                 _gb(e.xla.total if e.xla is not None else None), fits))
  widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
  line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] +
                   [line(r) for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> list:
  p = argparse.ArgumentParser(
      prog="python -m blockllm_jax.memory",
      description="Train-step memory of a LLaMA fine-tune per method (GiB).")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--preset", choices=sorted(PRESETS))
  source.add_argument("--gguf", type=Path, help="a LLaMA GGUF file (metadata only)")
  source.add_argument("--model-dir", type=Path,
                      help="an HF checkpoint folder (config.json only)")
  p.add_argument("--method", nargs="+", choices=METHODS + ("all",),
                 default=["all"])
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--param-dtype", default="bfloat16")
  p.add_argument("--dtype", default=None, help="activations (default: weights')")
  p.add_argument("--sparsity", type=float, default=0.9, help="BlockLLM")
  p.add_argument("--moment-dtype", default="float32", help="block optimizers")
  p.add_argument("--lora-rank", type=int, default=8)
  p.add_argument("--train-embeddings", action="store_true")
  p.add_argument("--remat", action="store_true", help="rematerialise each layer")
  p.add_argument("--remat-policy", default="nothing_saveable",
                 choices=models.REMAT_POLICIES)
  p.add_argument("--scan-layers", action="store_true",
                 help="stacked layers (plain steps only; compiles fast at any depth)")
  p.add_argument("--no-compile", action="store_true",
                 help="the memory model only (seconds instead of minutes)")
  args = p.parse_args(argv)
  methods = list(METHODS) if "all" in args.method else args.method
  try:
    settings = settings_for(args.preset, gguf=args.gguf, model_dir=args.model_dir,
                            scan_layers=args.scan_layers, remat=args.remat,
                            remat_policy=args.remat_policy)
    configs = [StepConfig(method=m, batch=args.batch, seq=args.seq,
                          param_dtype=args.param_dtype, dtype=args.dtype,
                          sparsity=args.sparsity, moment_dtype=args.moment_dtype,
                          lora_rank=args.lora_rank,
                          train_embeddings=args.train_embeddings) for m in methods]
  except ValueError as error:
    p.error(str(error))
  estimates = []
  for config in configs:
    estimates.append(estimate(settings, config, compile=not args.no_compile))
    print(f"  {config.method}: done", flush=True)
  print(f"\n{args.preset or args.gguf or args.model_dir}: batch {args.batch} x "
        f"seq {args.seq}, weights {args.param_dtype}, moments {args.moment_dtype}, "
        f"remat {args.remat}, layers {'scanned' if args.scan_layers else 'unrolled'}")
  print(format_table(estimates))
  instruments = sorted({e.instrument for e in estimates if e.xla is not None})
  for instrument in instruments:
    print(f"XLA column measured by {instrument}.")
  print(f"fits: peak <= {USABLE_FRACTION:.0%} of the card (GiB); peak = XLA's "
        "figure where it measured the requested dtypes, else the model total.")
  return estimates


if __name__ == "__main__":
  main()
