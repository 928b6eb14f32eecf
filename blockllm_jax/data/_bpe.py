"""Hugging Face tokenizers: train a byte-level BPE locally, or load one.

Both give an :class:`HFTokenizer`, which implements the
:class:`~blockllm_jax.data.Tokenizer` protocol around a
``transformers.PreTrainedTokenizerFast``. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

# The trained tokenizer's specials, in id order (pad=0, bos=1, eos=2, sep=3).
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SEP_TOKEN = "<pad>", "<s>", "</s>", "<sep>"
_SPECIALS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, SEP_TOKEN)
_NUM_BYTES = 256

# When tokenizer_config.json does not name a role (or there is only a bare
# tokenizer.json), an added special token with one of these names fills it.
_ROLE_NAMES = {
    "eos": ("</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"),
    "bos": ("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "pad": ("<pad>", "<|pad|>", "[PAD]"),
    "sep": ("<sep>", "[SEP]"),
}


class HFTokenizer:
  """The :class:`~blockllm_jax.data.Tokenizer` protocol over a Hugging Face fast tokenizer.

  ``encode`` adds no special tokens (even if the tokenizer's post-processor
  would add BOS) and reads text literally: a ``"</s>"`` in the text is
  encoded as characters, not as EOS, as :class:`ByteTokenizer` does.
  ``decode`` drops special tokens. Without a pad token, ``pad_id``
  is ``eos_id``; without a BOS token, ``bos_id`` is ``eos_id`` (as GPT-2
  does); without a separator token, ``sep_id`` is None.

  Args:
    hf_tokenizer: a ``transformers.PreTrainedTokenizerFast`` (in transformers
      5 also called ``TokenizersBackend``). Roles it lacks but whose usual
      token it has as an added special token (``</s>``, ``<pad>``, ...) are
      set on it, so :meth:`save` records them.

  Example:
    >>> tok = load_tokenizer("~/models/my-llama")  # doctest: +SKIP
    >>> tok.decode(tok.encode("hello")) == "hello"  # doctest: +SKIP
    True
  """

  def __init__(self, hf_tokenizer):
    self.hf_tokenizer = hf_tokenizer
    ids = {role: getattr(hf_tokenizer, f"{role}_token_id") for role in _ROLE_NAMES}
    special = {token.content for token in hf_tokenizer.added_tokens_decoder.values()
               if token.special}
    guessed = {}
    for role, names in _ROLE_NAMES.items():
      if ids[role] is None:
        name = next((n for n in names if n in special), None)
        if name is not None:
          guessed[f"{role}_token"] = name
    if guessed:
      hf_tokenizer.add_special_tokens(guessed)
      ids = {role: getattr(hf_tokenizer, f"{role}_token_id") for role in _ROLE_NAMES}
    if ids["eos"] is None:
      raise ValueError(
          "The tokenizer has no end-of-sequence token, which instruction data and "
          f"generation need; its special tokens are {sorted(special)}. Set eos_token "
          "in its tokenizer_config.json (or on the PreTrainedTokenizerFast).")
    self.eos_id = int(ids["eos"])
    self.bos_id = int(ids["bos"]) if ids["bos"] is not None else self.eos_id
    self.pad_id = int(ids["pad"]) if ids["pad"] is not None else self.eos_id
    self.sep_id = int(ids["sep"]) if ids["sep"] is not None else None
    self.vocab_size = len(hf_tokenizer)
    # Jinja template of the model's chat format, or None (see chat_prompts).
    self.chat_template = getattr(hf_tokenizer, "chat_template", None) or None
    from tokenizers import Tokenizer
    # A private copy, so that reading specials as text does not change the
    # caller's tokenizer (the flag is not saved in tokenizer.json anyway).
    self._encoder = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    self._encoder.encode_special_tokens = True
    # Some tokenizer.json files truncate or pad every encoding; a corpus must
    # not be cut at, say, 512 tokens.
    self._encoder.no_truncation()
    self._encoder.no_padding()

  def encode(self, text: str) -> list:
    """Token ids of ``text``, no special tokens added."""
    return self._encoder.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts) -> list:
    """``[encode(t) for t in texts]``, computed in parallel by ``tokenizers``."""
    encodings = self._encoder.encode_batch(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def chat_prompts(self, prompts, system: Optional[str] = None) -> list:
    """Token ids of each prompt as a user turn in the chat template,
    followed by the opening of the assistant's reply (the generation prompt).

    The template's special tokens (``<|im_start|>``, ...) are encoded as
    such; the prompt text itself is read literally.

    Args:
      prompts: user messages.
      system: a system message; None leaves it to the template (some add a
        default one).

    Returns:
      A list of token-id lists.

    Raises:
      ValueError: when the tokenizer has no chat template.
    """
    if not self.chat_template:
      raise ValueError("This tokenizer has no chat template (chat_template is None).")
    head = [] if system is None else [{"role": "system", "content": system}]
    texts = [self.hf_tokenizer.apply_chat_template(
        head + [{"role": "user", "content": prompt}], tokenize=False,
        add_generation_prompt=True) for prompt in prompts]
    # Rendered text contains the template's specials, so they must be parsed
    # here (the literal encoder would spell them out); a user's prompt that
    # contains "<|im_end|>" would be parsed too, as transformers does.
    return [list(e.ids) for e in self.hf_tokenizer.backend_tokenizer.encode_batch(
        texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of ``ids`` with special tokens dropped and spacing left as is."""
    return self.hf_tokenizer.decode([int(i) for i in ids], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False)

  def save(self, directory: Union[str, Path]) -> Path:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

    Args:
      directory: a folder (created if needed), e.g. a checkpoint folder.

    Returns:
      The folder, loadable by :func:`load_tokenizer`,
      ``AutoTokenizer.from_pretrained`` and
      ``PreTrainedTokenizerFast(tokenizer_file=directory / "tokenizer.json")``.
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    self.hf_tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    if config_path.exists():
      config = json.loads(config_path.read_text(encoding="utf-8"))
      # transformers 5 writes its new class name, which transformers 4 cannot
      # load; 5 reads the old name as the same class.
      if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                               encoding="utf-8")
    return directory

  def __repr__(self) -> str:
    return (f"HFTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id}, "
            f"bos_id={self.bos_id}, eos_id={self.eos_id}, sep_id={self.sep_id})")


def train_bpe_tokenizer(texts, vocab_size: int = 2048,
                        save_dir: Optional[Union[str, Path]] = None,
                        min_frequency: int = 2) -> HFTokenizer:
  """Trains a byte-level BPE on ``texts`` (locally, in seconds for ~1 MB).

  The initial alphabet is all 256 bytes, so any text encodes and
  ``decode(encode(text)) == text``. Ids 0..3 are ``<pad>``, ``<s>``,
  ``</s>``, ``<sep>``; no prefix space is added, so a string encodes the
  same at the start of a sequence as after a separator.

  Args:
    texts: a string or an iterable of strings (documents).
    vocab_size: the largest vocabulary (specials and 256 bytes included, so
      at least 260); a small corpus may run out of merges before it.
    save_dir: if given, the tokenizer is saved there (see :meth:`HFTokenizer.save`).
    min_frequency: fewest occurrences for a pair to be merged.

  Returns:
    An :class:`HFTokenizer`.

  Example:
    >>> tok = train_bpe_tokenizer([embedded_corpus()], vocab_size=512)
    >>> tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id
    (512, 0, 1, 2, 3)
  """
  if isinstance(texts, str):
    texts = [texts]
  try:
    texts = list(texts)
  except TypeError:
    raise ValueError(f"texts must be a string or an iterable of strings; got "
                     f"{type(texts).__name__}.") from None
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{i}] must be a string; got {type(text).__name__}.")
  if not any(texts):
    raise ValueError("texts is empty; need some text to train the BPE on.")
  smallest = _NUM_BYTES + len(_SPECIALS)
  if not isinstance(vocab_size, int) or vocab_size < smallest:
    raise ValueError(f"vocab_size must be an int of at least {smallest} (256 bytes + "
                     f"{len(_SPECIALS)} specials); got {vocab_size!r}.")
  if not isinstance(min_frequency, int) or min_frequency < 1:
    raise ValueError(f"min_frequency must be a positive int; got {min_frequency!r}.")

  _require("train_bpe_tokenizer")
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(_SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
  result = HFTokenizer(PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN,
      eos_token=EOS_TOKEN, sep_token=SEP_TOKEN))
  if save_dir is not None:
    result.save(save_dir)
  return result


def load_tokenizer(path: Union[str, Path]) -> HFTokenizer:
  """Loads a Hugging Face fast tokenizer, offline.

  Args:
    path: a folder with ``tokenizer.json`` (e.g. a Hugging Face LLaMA
      checkpoint; its ``tokenizer_config.json`` names the special tokens), a
      ``tokenizer.json`` file (special tokens then found by their usual
      names such as ``</s>``), or a ``.gguf`` model file (its tokenizer,
      special tokens and chat template, read from the metadata; needs the
      ``gguf`` package).

  Returns:
    An :class:`HFTokenizer`.

  Example:
    >>> tok = load_tokenizer("~/models/my-llama")  # doctest: +SKIP
  """
  path = Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"No tokenizer at {path}: expected a folder with "
                            "tokenizer.json or a tokenizer.json file.")
  if path.suffix.lower() == ".gguf" and path.is_file():
    _require("load_tokenizer")
    from blockllm_jax.data._gguf import gguf_hf_tokenizer
    return HFTokenizer(gguf_hf_tokenizer(path))
  if path.is_dir():
    if not (path / "tokenizer.json").is_file():
      found = sorted(p.name for p in path.iterdir() if "token" in p.name)
      raise ValueError(
          f"The folder {path} has no tokenizer.json (tokenizer files found: {found}). "
          "A SentencePiece-only tokenizer.model can be converted with transformers: "
          "AutoTokenizer.from_pretrained(folder).save_pretrained(folder).")
    _require("load_tokenizer")
    from transformers import PreTrainedTokenizerFast
    hf_tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
  else:
    _require("load_tokenizer")
    from transformers import PreTrainedTokenizerFast
    try:
      hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except Exception as error:  # tokenizers raises a bare Exception on bad JSON
      raise ValueError(f"{path} is not a tokenizers JSON file (tokenizer.json): "
                       f"{error}") from error
  return HFTokenizer(hf_tokenizer)


def _require(feature: str) -> None:
  """A clear ImportError when the optional Hugging Face packages are missing."""
  import importlib.util
  missing = [m for m in ("tokenizers", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(f"{feature} needs {' and '.join(missing)}: "
                      "pip install 'blockllm_jax[examples]'.")
