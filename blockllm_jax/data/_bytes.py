"""Raw-byte tokenizer and the corpus every Python install ships."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255 plus four specials (vocab 260)."""

  PAD, BOS, EOS, SEP = 256, 257, 258, 259
  vocab_size = 260

  def encode(self, text: str) -> list:
    return list(text.encode("utf-8"))

  def decode(self, tokens) -> str:
    return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", "replace")


def embedded_corpus() -> str:
  """English text from the standard library (``pydoc_data.topics``, ~460 kB)."""
  from pydoc_data import topics
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def language_model_batches(text: str, seq_len: int, batch_size: int, seed: int = 0):
  """Endless random windows of ``seq_len`` byte tokens, shape [batch, seq_len]."""
  data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
  if data.size <= seq_len:
    raise ValueError(f"The text has {data.size} bytes; need more than seq_len={seq_len}.")
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, data.size - seq_len, batch_size)
    yield np.stack([data[s:s + seq_len] for s in starts])
