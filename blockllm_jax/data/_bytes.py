"""The tokenizer protocol, a raw-byte tokenizer and a built-in corpus."""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Tokenizer(Protocol):
  """What every function in :mod:`blockllm_jax.data` needs from a tokenizer.

  :class:`ByteTokenizer` and :class:`HFTokenizer` implement it; any object
  with these attributes and methods works too.

  Attributes:
    vocab_size: number of token ids; every id is in ``[0, vocab_size)``.
    pad_id: id used to right-pad sequences.
    bos_id: id that starts every sequence.
    eos_id: id that ends every sequence (the model learns to stop on it).
    sep_id: id between prompt and answer, or None when the tokenizer has
      none (then a textual separator is used, see ``encode_instructions``).

  Example:
    >>> tok = ByteTokenizer()
    >>> isinstance(tok, Tokenizer)
    True
  """

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int
  sep_id: Optional[int]

  def encode(self, text: str) -> list:
    """Token ids of ``text`` without any special tokens."""

  def decode(self, ids) -> str:
    """The text of ``ids``, skipping special tokens."""


_REQUIRED = ("vocab_size", "pad_id", "bos_id", "eos_id", "sep_id", "encode", "decode")


def resolve_tokenizer(tokenizer) -> Tokenizer:
  """``tokenizer`` checked against :class:`Tokenizer`; None gives a ByteTokenizer.

  Args:
    tokenizer: a :class:`Tokenizer`, or None.

  Returns:
    The tokenizer to use.

  Example:
    >>> resolve_tokenizer(None).vocab_size
    260
  """
  if tokenizer is None:
    return ByteTokenizer()
  missing = [name for name in _REQUIRED if not hasattr(tokenizer, name)]
  if missing:
    raise TypeError(
        f"tokenizer {type(tokenizer).__name__} lacks {missing}; a tokenizer needs "
        f"{list(_REQUIRED)} (see blockllm_jax.data.Tokenizer), e.g. ByteTokenizer() "
        "or load_tokenizer(path).")
  return tokenizer


def encode_many(tokenizer: Tokenizer, texts) -> list:
  """Token ids of each text, batched when the tokenizer offers ``encode_batch``."""
  texts = list(texts)
  if hasattr(tokenizer, "encode_batch"):
    return tokenizer.encode_batch(texts)
  return [tokenizer.encode(text) for text in texts]


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255 plus four specials (vocab 260).

  ``PAD``/``BOS``/``EOS``/``SEP`` are the same ids as the protocol's
  ``pad_id``/``bos_id``/``eos_id``/``sep_id``.

  Example:
    >>> tok = ByteTokenizer()
    >>> tok.encode("hé")
    [104, 195, 169]
    >>> tok.decode([tok.BOS, 104, 195, 169, tok.EOS])
    'hé'
  """

  PAD, BOS, EOS, SEP = 256, 257, 258, 259
  pad_id, bos_id, eos_id, sep_id = PAD, BOS, EOS, SEP
  vocab_size = 260

  def encode(self, text: str) -> list:
    """UTF-8 bytes of ``text`` as ids 0..255 (no specials added)."""
    return list(text.encode("utf-8"))

  def decode(self, tokens) -> str:
    """Text of the byte ids in ``tokens``; specials are dropped, bad UTF-8 replaced."""
    return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", "replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def embedded_corpus() -> str:
  """English text from the standard library (``pydoc_data.topics``, ~460 kB)."""
  from pydoc_data import topics
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def encode_array(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """``tokenizer.encode(text)`` as int32, without a Python list for bytes."""
  if isinstance(tokenizer, ByteTokenizer):
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  return np.asarray(tokenizer.encode(text), np.int32)


def language_model_batches(text: str, seq_len: int, batch_size: int, seed: int = 0,
                           tokenizer=None) -> Iterator[np.ndarray]:
  """Endless random windows of ``seq_len`` tokens of ``text``.

  The text is encoded once, up front; each batch is ``batch_size`` windows
  starting at uniformly random offsets.

  Args:
    text: the training corpus.
    seq_len: tokens per window.
    batch_size: windows per batch.
    seed: random seed for the window offsets.
    tokenizer: a :class:`Tokenizer`; None uses :class:`ByteTokenizer`.

  Returns:
    An iterator of int32 arrays of shape ``[batch_size, seq_len]``.

  Example:
    >>> batches = language_model_batches(embedded_corpus(), 64, 8)
    >>> next(batches).shape
    (8, 64)
  """
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int; got {seq_len!r}.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
  tokenizer = resolve_tokenizer(tokenizer)
  data = encode_array(tokenizer, text)
  if data.size <= seq_len:
    unit = "bytes" if isinstance(tokenizer, ByteTokenizer) else "tokens"
    raise ValueError(f"The text has {data.size} {unit}; need more than seq_len={seq_len}.")
  return _random_windows(data, seq_len, batch_size, seed)


def _random_windows(data: np.ndarray, seq_len: int, batch_size: int, seed: int):
  rng = np.random.default_rng(seed)
  offsets = np.arange(seq_len)
  while True:
    starts = rng.integers(0, data.size - seq_len, batch_size)
    yield data[starts[:, None] + offsets]
