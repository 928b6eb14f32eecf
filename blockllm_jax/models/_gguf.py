"""LLaMA-architecture GGUF files (llama.cpp's format) to Flax parameters.

A GGUF file holds the architecture as metadata (``llama.block_count``,
``llama.rope.freq_base``, ...) and each tensor either as floats (F32, F16,
BF16) or quantised in blocks (Q8_0, Q4_0, Q4_1, the K-quants, ...). We read
both with the ``gguf`` package (``pip install gguf``), dequantise to float32,
undo the row permutation llama.cpp's converter applies to the query and key
projections (it interleaves each head's two rotary halves, to match its own
rotary kernel), and map the tensors onto the Hugging Face layout that
:func:`~blockllm_jax.models.load_hf_checkpoint` uses. A dequantised
checkpoint is then a normal float model: fine-tune it, and
:func:`~blockllm_jax.models.save_hf_checkpoint` writes it as safetensors
(GGUF -> Hugging Face conversion).

Example:
  >>> settings, params = load_gguf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> tokenizer = blockllm_jax.data.load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")
  >>> save_hf_checkpoint("smollm2-hf", settings, params, tokenizer=tokenizer)

References:
  GGUF specification: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
  llama.cpp ``convert_hf_to_gguf.py`` (tensor names, Q/K permutation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from blockllm_jax.models._hf import finish_loaded
from blockllm_jax.models._hf import hf_layout
from blockllm_jax.models.llama import LORA_TARGETS
from blockllm_jax.models.llama import LlamaSettings

# Architectures whose tensors and metadata are LLaMA's.
ARCHITECTURES = ("llama",)

# GGUF tensor name (``{n}`` = layer) -> Hugging Face tensor name.
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{n}.attn_q.weight": "model.layers.{n}.self_attn.q_proj.weight",
    "blk.{n}.attn_k.weight": "model.layers.{n}.self_attn.k_proj.weight",
    "blk.{n}.attn_v.weight": "model.layers.{n}.self_attn.v_proj.weight",
    "blk.{n}.attn_output.weight": "model.layers.{n}.self_attn.o_proj.weight",
    "blk.{n}.ffn_gate.weight": "model.layers.{n}.mlp.gate_proj.weight",
    "blk.{n}.ffn_up.weight": "model.layers.{n}.mlp.up_proj.weight",
    "blk.{n}.ffn_down.weight": "model.layers.{n}.mlp.down_proj.weight",
    "blk.{n}.attn_norm.weight": "model.layers.{n}.input_layernorm.weight",
    "blk.{n}.ffn_norm.weight": "model.layers.{n}.post_attention_layernorm.weight",
}


def _require_gguf():
  try:
    import gguf
  except ImportError:
    raise ImportError("Reading GGUF files needs the gguf package: "
                      "pip install gguf.") from None
  return gguf


def open_gguf(path: Union[str, Path]):
  """A ``gguf.GGUFReader`` of ``path`` (memory-mapped; nothing read yet).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not GGUF.
  """
  gguf = _require_gguf()
  path = Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"No GGUF file at {path}.")
  try:
    return gguf.GGUFReader(str(path))
  except ValueError as error:  # the reader checks the magic bytes
    raise ValueError(f"{path} is not a GGUF file: {error}") from error


def gguf_metadata(reader, key: str, default: Any = None) -> Any:
  """The value of metadata ``key`` (str, number, bool or list), or ``default``."""
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _architecture(reader, path) -> str:
  arch = gguf_metadata(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"GGUF file {path} has general.architecture {arch!r}; "
                     f"accepted: {', '.join(map(repr, ARCHITECTURES))}.")
  return arch


def settings_from_gguf(reader, path: Union[str, Path] = "<gguf>",
                       **overrides) -> LlamaSettings:
  """:class:`LlamaSettings` of a GGUF file's metadata.

  Args:
    reader: from :func:`open_gguf`.
    path: the file name, for error messages.
    **overrides: other :class:`LlamaSettings` fields.

  Raises:
    ValueError: naming the metadata key, for settings our LLaMA cannot
      reproduce (another architecture, partial rotary embeddings, rope
      scaling, Llama 3.1 ``rope_freqs`` factors).
  """
  arch = _architecture(reader, path)
  meta = lambda key, default=None: gguf_metadata(reader, f"{arch}.{key}", default)
  required = ("embedding_length", "feed_forward_length", "block_count",
              "attention.head_count")
  missing = [f"{arch}.{k}" for k in required if meta(k) is None]
  if missing:
    raise ValueError(f"GGUF file {path} lacks metadata {missing}.")
  hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
  head_dim = int(meta("attention.key_length", hidden // heads))
  rotary = meta("rope.dimension_count", head_dim)
  if int(rotary) != head_dim:
    raise ValueError(f"GGUF file {path}: {arch}.rope.dimension_count={rotary} "
                     f"!= head dim {head_dim} (partial rotary embeddings) is not "
                     "supported; accepted: equal.")
  scaling = meta("rope.scaling.type")
  if scaling not in (None, "none"):
    raise ValueError(f"GGUF file {path}: {arch}.rope.scaling.type={scaling!r} is "
                     "not supported; accepted: none.")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError(f"GGUF file {path} has rope_freqs.weight (Llama 3.1-style "
                     "rope frequency factors), which is not supported; accepted: "
                     "files without it (or load the Hugging Face checkpoint).")
  vocab = meta("vocab_size")
  if vocab is None:
    tokens = gguf_metadata(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else next(
        int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
  values = dict(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(meta("feed_forward_length")),
      num_hidden_layers=int(meta("block_count")), num_attention_heads=heads,
      num_key_value_heads=int(meta("attention.head_count_kv", heads)),
      rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(meta("rope.freq_base", 10000.0)),
      max_position_embeddings=int(meta("context_length", 2048)),
      head_dim=head_dim,
      tie_word_embeddings="output.weight" not in names)
  values.update(overrides)
  return LlamaSettings(**values)


def _gguf_to_hf_names(num_layers: int) -> dict:
  out = {}
  for gguf_name, hf_name in _TENSOR_NAMES.items():
    if "{n}" in gguf_name:
      for n in range(num_layers):
        out[gguf_name.format(n=n)] = hf_name.format(n=n)
    else:
      out[gguf_name] = hf_name
  return out


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K permutation: within each head its converter
  stores rows ``(2, half)`` as ``(half, 2)``, i.e. the two rotary halves
  interleaved; we read them back into halves (HF's layout)."""
  rows = weight.shape[0]
  half = rows // heads // 2
  return (weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2)
          .reshape(weight.shape))


def dequantize_tensor(tensor, path: Union[str, Path] = "<gguf>") -> np.ndarray:
  """A GGUF tensor as float32 in NumPy (row-major, HF) order.

  Raises:
    ValueError: naming the tensor and its type, when ``gguf`` cannot
      dequantise that type.
  """
  gguf = _require_gguf()
  shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
  try:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  except (NotImplementedError, KeyError, ValueError) as error:
    raise ValueError(
        f"GGUF file {path}: tensor {tensor.name} has type "
        f"{tensor.tensor_type.name}, which the installed gguf "
        f"{getattr(gguf, '__version__', '')} cannot dequantise ({error}).") from error
  return np.asarray(values, np.float32).reshape(shape)


def load_gguf_checkpoint(path: Union[str, Path], dtype: Any = None, *,
                         lora_rank: int = 0, lora_alpha: float = 16.0,
                         lora_targets=LORA_TARGETS,
                         rng: Optional[jax.Array] = None,
                         scan_layers: bool = False):
  """Reads a LLaMA-architecture GGUF file into Flax parameters.

  Every tensor type the ``gguf`` package dequantises is read (F32, F16,
  BF16, Q8_0, Q4_0, Q4_1, Q5_*, K-quants, ...): quantised weights become
  float32 values of the quantised ones (so the model computes what the GGUF
  file does, not what the unquantised original did).

  Args:
    path: the ``.gguf`` file.
    dtype: parameter dtype; None gives float32.
    lora_rank: if > 0, adds fresh adapters (outputs unchanged), see
      :func:`~blockllm_jax.models.add_lora`.
    lora_alpha: LoRA scale numerator.
    lora_targets: projections that get adapters.
    rng: PRNG key for the adapters; required when ``lora_rank > 0``.
    scan_layers: return the scanned layout (layers stacked on a leading
      axis; see :func:`~blockllm_jax.models.stack_layers`).

  Returns:
    ``(settings, params)`` for :class:`~blockllm_jax.models.LlamaForCausalLM`.

  Raises:
    ValueError: for another architecture or unsupported settings (naming
      the metadata key), tensor types ``gguf`` cannot dequantise, and
      missing, unexpected or wrongly shaped tensors (naming them).

  Example:
    >>> settings, params = load_gguf_checkpoint("model.Q8_0.gguf")  # doctest: +SKIP
  """
  reader = open_gguf(path)
  settings = settings_from_gguf(reader, path)
  layout = hf_layout(settings)
  names = _gguf_to_hf_names(settings.num_hidden_layers)
  tensors = {t.name: t for t in reader.tensors}
  unexpected = sorted(set(tensors) - set(names))
  if unexpected:
    raise ValueError(f"GGUF file {path} has tensors {unexpected[:8]} that a "
                     f"{settings.num_hidden_layers}-layer LLaMA does not have.")
  missing = sorted(g for g, h in names.items() if h in layout and g not in tensors)
  if missing:
    raise ValueError(f"GGUF file {path} lacks tensors {missing[:8]}.")
  out_dtype = np.dtype(dtype if dtype is not None else np.float32)
  flat = {}
  for gguf_name, tensor in tensors.items():
    hf_name = names[gguf_name]
    flax_path, shape, transpose = layout[hf_name]
    weight = dequantize_tensor(tensor, path)
    if weight.shape != shape:
      raise ValueError(f"GGUF tensor {gguf_name} has shape {weight.shape} (HF "
                       f"order); the metadata implies {shape}.")
    if gguf_name.endswith("attn_q.weight"):
      weight = _unpermute_rows(weight, settings.num_attention_heads)
    elif gguf_name.endswith("attn_k.weight"):
      weight = _unpermute_rows(weight, settings.num_key_value_heads)
    if transpose:
      weight = weight.T
    flat[flax_path] = jnp.asarray(weight.astype(out_dtype, copy=False))
  params = traverse_util.unflatten_dict(flat)
  return finish_loaded(settings, params, scan_layers=scan_layers,
                       lora_rank=lora_rank, lora_alpha=lora_alpha,
                       lora_targets=lora_targets, rng=rng)
