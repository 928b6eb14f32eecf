"""The tokenizer stored in a GGUF file's metadata, as a Hugging Face fast
tokenizer.

A GGUF file has no ``tokenizer.json``: llama.cpp keeps the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges, each token's type (normal,
control, user-defined, ...), the special-token ids, the pre-tokenizer's name
(``tokenizer.ggml.pre``) and the chat template as metadata. For byte-level
BPE files (``tokenizer.ggml.model == "gpt2"``: GPT-2, SmolLM, Llama 3, ...)
we build the ``tokenizers`` pipeline from those fields, splitting text the
way llama.cpp does for that pre-tokenizer name. Other tokenizer models
(SentencePiece ``"llama"``, ...) are converted by ``transformers``' own GGUF
reader.

References:
  GGUF specification: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
  llama.cpp ``llama-vocab.cpp`` (pre-tokenizer regular expressions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

# GPT-2's split (``tokenizers``' ByteLevel(use_regex=True) applies it).
_GPT2 = "gpt2"
# Digits one by one, then GPT-2's split (llama.cpp: starcoder, smollm, ...).
_DIGITS_GPT2 = "digits+gpt2"
# Llama 3's split: numbers in runs of at most three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# ``tokenizer.ggml.pre`` names whose split we reproduce, as in llama.cpp.
PRE_TOKENIZERS = {
    "default": _GPT2, "gpt2": _GPT2, "gpt-2": _GPT2, "mpt": _GPT2, "olmo": _GPT2,
    "jais": _GPT2,
    "smollm": _DIGITS_GPT2, "starcoder": _DIGITS_GPT2, "refact": _DIGITS_GPT2,
    "command-r": _DIGITS_GPT2, "codeshell": _DIGITS_GPT2, "exaone": _DIGITS_GPT2,
    "minerva-7b": _DIGITS_GPT2,
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
}
# llama.cpp's token types.
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(name: str, add_prefix_space: bool, path):
  from tokenizers import Regex, pre_tokenizers
  kind = PRE_TOKENIZERS.get(name)
  if kind is None:
    raise ValueError(f"GGUF file {path}: tokenizer.ggml.pre {name!r} is not "
                     f"supported; accepted: {sorted(PRE_TOKENIZERS)}.")
  if kind == _GPT2:
    return pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
  if kind == _DIGITS_GPT2:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)])
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(kind), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False)])


def _byte_level_bpe(reader, path):
  """A ``PreTrainedTokenizerFast`` of a ``gpt2``-model GGUF tokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models
  from transformers import PreTrainedTokenizerFast
  from blockllm_jax.models._gguf import gguf_metadata
  meta = lambda key, default=None: gguf_metadata(reader, "tokenizer." + key, default)
  tokens = list(meta("ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in meta("ggml.merges", [])]
  types = list(meta("ggml.token_type", [1] * len(tokens)))
  bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=merges, fuse_unk=False))
  add_prefix_space = bool(meta("ggml.add_space_prefix", False))
  bpe.pre_tokenizer = _pre_tokenizer(meta("ggml.pre", "default"), add_prefix_space, path)
  bpe.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) and user-defined ones are matched
  # whole before BPE, as llama.cpp does; only control ones are "special"
  # (dropped by decode(skip_special_tokens=True)).
  bpe.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                  for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
  roles = {}
  for role, key in (("bos_token", "ggml.bos_token_id"), ("eos_token", "ggml.eos_token_id"),
                    ("unk_token", "ggml.unknown_token_id"),
                    ("pad_token", "ggml.padding_token_id")):
    index = meta(key)
    if index is not None and 0 <= int(index) < len(tokens):
      roles[role] = tokens[int(index)]
  hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **roles)
  template = meta("chat_template")
  if template:
    hf_tokenizer.chat_template = template
  return hf_tokenizer


def gguf_hf_tokenizer(path: Union[str, Path]):
  """The ``transformers`` fast tokenizer described by a GGUF file's metadata.

  Args:
    path: a ``.gguf`` file.

  Returns:
    A ``PreTrainedTokenizerFast`` with the file's special tokens and chat
    template.

  Raises:
    ValueError: when the file has no tokenizer or one whose pre-tokenizer
      is not supported, naming the metadata value.
  """
  from blockllm_jax.models._gguf import gguf_metadata
  from blockllm_jax.models._gguf import open_gguf
  path = Path(path).expanduser()
  reader = open_gguf(path)
  model = gguf_metadata(reader, "tokenizer.ggml.model")
  if model is None or gguf_metadata(reader, "tokenizer.ggml.tokens") is None:
    raise ValueError(f"GGUF file {path} has no tokenizer (no tokenizer.ggml.model / "
                     "tokenizer.ggml.tokens metadata).")
  if model == "gpt2":
    return _byte_level_bpe(reader, path)
  # SentencePiece and other models: transformers' own GGUF conversion.
  from transformers import AutoTokenizer
  try:
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                         local_files_only=True)
  except Exception as error:  # transformers raises various types here
    raise ValueError(f"GGUF file {path}: tokenizer.ggml.model {model!r} could not be "
                     f"converted by transformers ({error}); accepted here: 'gpt2', "
                     "or what transformers' GGUF reader converts.") from error
