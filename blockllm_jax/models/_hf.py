"""Hugging Face LLaMA checkpoints (``config.json`` + safetensors) to and from
:class:`~blockllm_jax.models.LlamaForCausalLM` parameters.

Supported: what ``transformers.LlamaForCausalLM`` computes for bias-free
SiLU LLaMA configs, i.e. LLaMA 1/2/3/3.1/3.2 (GQA, explicit ``head_dim``,
tied embeddings, ``rope_theta``, ``rope_scaling`` None/"default"/"llama3"),
in float32, bfloat16 or float16. Both config styles are read: ``rope_theta``
+ ``rope_scaling`` (transformers 4) and ``rope_parameters`` (transformers 5).
Needs the ``safetensors`` package (not PyTorch).

Example:
  >>> settings, params = load_hf_checkpoint("Llama-3.2-1B", dtype=jnp.bfloat16)
  >>> logits = LlamaForCausalLM(settings, dtype=jnp.bfloat16).apply(
  ...     {"params": params}, tokens)
  >>> save_hf_checkpoint("out", settings, params, max_shard_size="2GB")

References:
  https://huggingface.co/docs/safetensors (file format, sharded index)
  transformers/models/llama/modeling_llama.py, modeling_rope_utils.py
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blockllm_jax.models._lora import add_lora
from blockllm_jax.models._lora import merge_lora
from blockllm_jax.models.llama import LORA_TARGETS
from blockllm_jax.models.llama import Llama3RopeScaling
from blockllm_jax.models.llama import LlamaSettings
from blockllm_jax.models.llama import stack_layers
from blockllm_jax.models.llama import unstack_layers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# LlamaConfig attributes read from objects without ``to_dict``.
_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor",
    "original_max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "quantization_config")
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size",
             "num_hidden_layers", "num_attention_heads")
# Settings the model hard-codes: (config field, accepted values); None means
# the LlamaConfig default, as in transformers ("swish" is its alias of SiLU).
_FIXED = (("hidden_act", ("silu", "swish")), ("attention_bias", (False,)),
          ("mlp_bias", (False,)))
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def _config_dict(config: Any) -> dict:
  if isinstance(config, collections.abc.Mapping):
    return dict(config)
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return {k: getattr(config, k) for k in _CONFIG_KEYS if hasattr(config, k)}


def rope_scaling_from_hf(rope: Optional[dict], max_position_embeddings=None,
                         original_max_position_embeddings=None
                         ) -> Optional[Llama3RopeScaling]:
  """Reads an HF ``rope_scaling``/``rope_parameters`` dict.

  Args:
    rope: the dict (None or without ``rope_type`` means unscaled).
    max_position_embeddings: default of ``original_max_position_embeddings``,
      as in transformers.
    original_max_position_embeddings: a top-level config value, which
      transformers prefers to the dict's.

  Raises:
    ValueError: for rope types other than "default" and "llama3", partial
      rotary embeddings, or llama3 dicts lacking a factor.
  """
  if rope is None or isinstance(rope, Llama3RopeScaling):
    return rope
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  partial = rope.get("partial_rotary_factor", 1.0)
  if partial not in (None, 1, 1.0):
    raise ValueError(f"rope partial_rotary_factor={partial} is not supported; "
                     "accepted: 1.0.")
  if rope_type == "default":
    return None
  if rope_type != "llama3":
    raise ValueError(f"rope_scaling rope_type {rope_type!r} is not supported; "
                     "accepted: None, 'default', 'llama3'.")
  missing = [k for k in _LLAMA3_KEYS if rope.get(k) is None]
  if missing:
    raise ValueError(f"llama3 rope_scaling lacks {missing}.")
  original = (original_max_position_embeddings or
              rope.get("original_max_position_embeddings") or
              max_position_embeddings)
  if original is None:
    raise ValueError("llama3 rope_scaling lacks original_max_position_embeddings.")
  if rope["high_freq_factor"] == rope["low_freq_factor"]:
    raise ValueError("llama3 rope_scaling needs high_freq_factor != low_freq_factor.")
  return Llama3RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                           float(rope["high_freq_factor"]), int(original))


def settings_from_hf_config(config: Any, **overrides) -> LlamaSettings:
  """:class:`LlamaSettings` of an HF LLaMA config.

  Missing optional fields take ``transformers.LlamaConfig``'s defaults (e.g.
  ``num_key_value_heads = num_attention_heads``).

  Args:
    config: a ``config.json`` dict, a ``transformers.LlamaConfig`` or an
      object with its attributes.
    **overrides: other :class:`LlamaSettings` fields (e.g. LoRA ones).

  Raises:
    ValueError: naming the field, for configs this model would not reproduce.
  """
  c = _config_dict(config)
  model_type = c.get("model_type")
  if model_type not in (None, "llama"):
    raise ValueError(f"model_type {model_type!r} is not supported; accepted: "
                     "'llama'.")
  missing = [k for k in _REQUIRED if c.get(k) is None]
  if missing:
    raise ValueError(f"config lacks required fields {missing}.")
  for key, accepted in _FIXED:
    if c.get(key) is not None and c[key] not in accepted:
      raise ValueError(f"config {key}={c[key]!r} is not supported; accepted: "
                       f"{', '.join(map(repr, accepted))}.")
  if c.get("quantization_config"):
    raise ValueError("config quantization_config is set: quantized checkpoints "
                     "are not supported; accepted: unquantized weights.")
  if c.get("partial_rotary_factor") not in (None, 1, 1.0):
    raise ValueError(f"config partial_rotary_factor="
                     f"{c['partial_rotary_factor']} is not supported; accepted: 1.0.")
  # As transformers: `rope_scaling` replaces `rope_parameters`, and a theta in
  # the dict wins over a top-level `rope_theta`.
  rope = c.get("rope_scaling") or c.get("rope_parameters")
  if rope is not None and not isinstance(rope, (collections.abc.Mapping,
                                                Llama3RopeScaling)):
    raise ValueError(f"config rope_scaling must be a dict, got {rope!r}.")
  theta = (rope.get("rope_theta") if isinstance(rope, collections.abc.Mapping)
           else None) or c.get("rope_theta") or 10000.0
  max_positions = c.get("max_position_embeddings") or 2048
  heads = c["num_attention_heads"]
  values = dict(
      vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
      intermediate_size=c["intermediate_size"],
      num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
      num_key_value_heads=c.get("num_key_value_heads") or heads,
      rms_norm_eps=float(c.get("rms_norm_eps") or 1e-6),
      rope_theta=float(theta),
      tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
      max_position_embeddings=max_positions, head_dim=c.get("head_dim"),
      rope_scaling=rope_scaling_from_hf(
          dict(rope) if isinstance(rope, collections.abc.Mapping) else rope,
          max_positions, c.get("original_max_position_embeddings")))
  values.update(overrides)
  return LlamaSettings(**values)


def _dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name  # "float32", "bfloat16" (ml_dtypes), "float16"


def hf_config_dict(settings: LlamaSettings, dtype: Any = None) -> dict:
  """``config.json`` contents of an HF ``LlamaForCausalLM`` with ``settings``.

  Rotary settings are written both as ``rope_theta``/``rope_scaling``
  (transformers 4) and ``rope_parameters`` (transformers 5). LoRA fields are
  not part of HF configs and are dropped.
  """
  s = settings
  scaling = None
  if s.rope_scaling is not None:
    r = s.rope_scaling
    scaling = {"rope_type": "llama3", "factor": r.factor,
               "low_freq_factor": r.low_freq_factor,
               "high_freq_factor": r.high_freq_factor,
               "original_max_position_embeddings": r.original_max_position_embeddings}
  config = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": s.vocab_size, "hidden_size": s.hidden_size,
      "intermediate_size": s.intermediate_size,
      "num_hidden_layers": s.num_hidden_layers,
      "num_attention_heads": s.num_attention_heads,
      "num_key_value_heads": s.num_key_value_heads, "head_dim": s.head_dim,
      "hidden_act": "silu", "max_position_embeddings": s.max_position_embeddings,
      "rms_norm_eps": s.rms_norm_eps, "rope_theta": s.rope_theta,
      "rope_scaling": scaling,
      "rope_parameters": {**(scaling or {"rope_type": "default"}),
                          "rope_theta": s.rope_theta},
      "tie_word_embeddings": s.tie_word_embeddings, "attention_bias": False,
      "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": 0.02,
      "pretraining_tp": 1, "use_cache": True,
  }
  if dtype is not None:
    config["torch_dtype"] = config["dtype"] = _dtype_name(dtype)
  return config


def hf_layout(s: LlamaSettings) -> dict:
  """HF tensor name -> (Flax path, HF shape, transposed?), in module order."""
  q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
  h, i = s.hidden_size, s.intermediate_size
  layout = {"model.embed_tokens.weight":
            (("model", "embed_tokens", "embedding"), (s.vocab_size, h), False)}
  for n in range(s.num_hidden_layers):
    for module, name, shape in (
        ("self_attn", "q_proj", (q, h)), ("self_attn", "k_proj", (kv, h)),
        ("self_attn", "v_proj", (kv, h)), ("self_attn", "o_proj", (h, q)),
        ("mlp", "gate_proj", (i, h)), ("mlp", "up_proj", (i, h)),
        ("mlp", "down_proj", (h, i))):
      layout[f"model.layers.{n}.{module}.{name}.weight"] = (
          ("model", f"layers_{n}", module, name, "kernel"), shape, True)
    for norm in ("input_layernorm", "post_attention_layernorm"):
      layout[f"model.layers.{n}.{norm}.weight"] = (
          ("model", f"layers_{n}", norm, "weight"), (h,), False)
  layout["model.norm.weight"] = (("model", "norm", "weight"), (h,), False)
  if not s.tie_word_embeddings:
    layout["lm_head.weight"] = (("lm_head", "kernel"), (s.vocab_size, h), True)
  return layout


def _names(names, limit=8) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _weight_files(folder: Path) -> dict:
  """HF tensor name -> safetensors file holding it."""
  index = folder / INDEX_FILE
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    return {name: folder / file for name, file in weight_map.items()}
  single = folder / SINGLE_FILE
  if not single.exists():
    raise FileNotFoundError(
        f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE} (PyTorch .bin "
        "checkpoints are not read; convert them to safetensors).")
  from safetensors import safe_open
  with safe_open(single, "np") as f:
    return {name: single for name in f.keys()}


def load_hf_checkpoint(path: Union[str, Path], dtype: Any = None, *,
                       lora_rank: int = 0, lora_alpha: float = 16.0,
                       lora_targets=LORA_TARGETS,
                       rng: Optional[jax.Array] = None,
                       scan_layers: bool = False):
  """Reads an HF LLaMA checkpoint folder into Flax parameters.

  Args:
    path: folder with ``config.json`` and ``model.safetensors`` or
      ``model.safetensors.index.json`` plus its shards.
    dtype: parameter dtype; None keeps the stored dtype of each tensor.
    lora_rank: if > 0, adds fresh adapters (``lora_b = 0``, so outputs are
      unchanged) around the loaded kernels, see :func:`add_lora`.
    lora_alpha: LoRA scale numerator.
    lora_targets: projections that get adapters.
    rng: PRNG key for the adapters; required when ``lora_rank > 0``.
    scan_layers: return the scanned layout (``settings.scan_layers`` set,
      layers stacked on a leading axis; see :func:`stack_layers`).

  Returns:
    ``(settings, params)`` for :class:`LlamaForCausalLM`.

  Raises:
    ValueError: for unsupported config fields, and for missing, unexpected or
      wrongly shaped tensors, naming them.
  """
  from safetensors import safe_open
  folder = Path(path)
  settings = settings_from_hf_config(json.loads((folder / "config.json").read_text()))
  files = _weight_files(folder)
  layout = hf_layout(settings)
  # Ignorable: rotary buffers some old exports saved, and a stored copy of a
  # tied head (transformers ties it to the embedding and ignores it too).
  ignored = {n for n in files if n.endswith(".rotary_emb.inv_freq") or
             (settings.tie_word_embeddings and n == "lm_head.weight")}
  missing = layout.keys() - files.keys()
  if missing:
    raise ValueError(f"checkpoint {folder} lacks tensors {_names(missing)}.")
  unexpected = files.keys() - layout.keys() - ignored
  if unexpected:
    raise ValueError(f"checkpoint {folder} has unexpected tensors "
                     f"{_names(unexpected)} for a LlamaForCausalLM config.")
  by_file = {}
  for name in layout:
    by_file.setdefault(files[name], []).append(name)
  flat = {}
  for file, names in by_file.items():
    with safe_open(file, "np") as f:
      for name in names:
        flax_path, shape, transpose = layout[name]
        tensor = f.get_tensor(name)
        if tuple(tensor.shape) != shape:
          raise ValueError(f"tensor {name} has shape {tuple(tensor.shape)}; "
                           f"config.json implies {shape}.")
        if transpose:
          tensor = tensor.T
        if dtype is not None:
          tensor = tensor.astype(np.dtype(dtype))
        flat[flax_path] = jnp.asarray(tensor)
  return finish_loaded(settings, traverse_util.unflatten_dict(flat),
                       scan_layers=scan_layers, lora_rank=lora_rank,
                       lora_alpha=lora_alpha, lora_targets=lora_targets, rng=rng)


def finish_loaded(settings: LlamaSettings, params, *, scan_layers: bool,
                  lora_rank: int, lora_alpha: float, lora_targets, rng):
  """The loaders' shared last step: the scanned layout and fresh LoRA
  adapters, as their ``scan_layers`` / ``lora_*`` arguments ask."""
  if scan_layers:
    settings = dataclasses.replace(settings, scan_layers=True)
    params = stack_layers(params, settings.num_hidden_layers)
  if lora_rank:
    if rng is None:
      raise ValueError("rng is required to initialise LoRA adapters.")
    settings, params = add_lora(settings, params, lora_rank, rng,
                                alpha=lora_alpha, targets=lora_targets)
  return settings, params


def _size_bytes(size: Union[int, str]) -> int:
  """``1000``, ``"20KB"`` (10**3) or ``"2GiB"`` (2**30) as bytes, as in HF."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper())
  if not match:
    raise ValueError(f"max_shard_size {size!r} is not a size; accepted: bytes "
                     "as int, or e.g. '500MB', '2GiB'.")
  number, prefix, binary = match.groups()
  base = 1024 if binary else 1000
  return int(float(number) * base ** " KMGT".index(prefix or " "))


def save_hf_checkpoint(path: Union[str, Path], settings: LlamaSettings, params,
                       *, max_shard_size: Union[int, str, None] = None,
                       dtype: Any = None, tokenizer: Any = None) -> None:
  """Writes an HF LLaMA checkpoint that ``transformers`` and
  :func:`load_hf_checkpoint` read.

  LoRA adapters are merged into the kernels first (HF checkpoints have none).
  Earlier ``model*.safetensors`` files and index in ``path`` are removed, so
  stale shards cannot shadow the new ones.

  Args:
    path: output folder (created).
    settings: the model's settings.
    params: the model's parameters (either layout: a scanned model's layers
      are written one tensor per layer, as HF stores them).
    max_shard_size: None writes one ``model.safetensors``; otherwise bytes
      (int, or ``"5GB"``-style string) per ``model-0000k-of-0000n.safetensors``
      shard, listed in ``model.safetensors.index.json``. A tensor larger than
      the limit gets a shard of its own.
    dtype: tensor dtype to write; None keeps each parameter's.
    tokenizer: optional tokenizer of :mod:`blockllm_jax.data` (``bos_id``,
      ``eos_id``, ``pad_id``, ``save``): its special-token ids go into
      ``config.json`` (``generate()`` reads them there) and its files are
      saved beside the weights.

  Raises:
    ValueError: when ``params`` do not match ``settings``, naming the paths.
  """
  from safetensors.numpy import save_file
  settings, params = merge_lora(settings, params)
  if settings.scan_layers:  # HF checkpoints hold one tensor per layer
    settings = dataclasses.replace(settings, scan_layers=False)
    params = unstack_layers(params)
  flat = traverse_util.flatten_dict(params)
  layout = hf_layout(settings)
  expected = {p: (name, shape) for name, (p, shape, _) in layout.items()}
  as_str = lambda paths: _names("/".join(p) for p in paths)
  if flat.keys() - expected.keys():
    raise ValueError(f"params have entries {as_str(flat.keys() - expected.keys())}"
                     " that settings do not describe.")
  if expected.keys() - flat.keys():
    raise ValueError(f"params lack {as_str(expected.keys() - flat.keys())}.")
  out_dtype = lambda p: np.dtype(dtype if dtype is not None else flat[p].dtype)
  for p, (name, shape) in expected.items():
    hf_shape = tuple(flat[p].shape[::-1]) if layout[name][2] else tuple(flat[p].shape)
    if hf_shape != shape:
      raise ValueError(f"param {'/'.join(p)} has shape {flat[p].shape}, which "
                       f"does not match settings (HF {name} {shape}).")

  # Plan shards from sizes alone, then materialise one shard at a time.
  limit = math.inf if max_shard_size is None else _size_bytes(max_shard_size)
  shards, size = [[]], 0
  for name, (p, shape, _) in layout.items():
    nbytes = math.prod(shape) * out_dtype(p).itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes

  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  for old in folder.iterdir():
    if old.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(old.name):
      old.unlink()
  config = hf_config_dict(settings, out_dtype(("model", "embed_tokens", "embedding")))
  if tokenizer is not None:
    config.update(bos_token_id=int(tokenizer.bos_id), eos_token_id=int(tokenizer.eos_id),
                  pad_token_id=int(tokenizer.pad_id))
    if hasattr(tokenizer, "save"):
      tokenizer.save(folder)
  (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  weight_map, total = {}, 0
  for k, names in enumerate(shards):
    file = (SINGLE_FILE if len(shards) == 1 else
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors")
    tensors = {}
    for name in names:
      p, _, transpose = layout[name]
      array = np.asarray(jax.device_get(flat[p])).astype(out_dtype(p), copy=False)
      tensors[name] = np.ascontiguousarray(array.T if transpose else array)
      weight_map[name] = file
      total += tensors[name].nbytes
    # "pt": the tensors are in PyTorch's layout, which transformers checks.
    save_file(tensors, folder / file, metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
