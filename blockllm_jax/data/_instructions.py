"""Instruction examples: a synthetic task and user (prompt, answer) pairs.

Each example is ``BOS prompt SEP answer EOS`` right-padded with the pad id,
or, for a tokenizer with a chat template (an instruct model's), the prompt
as a user turn in that template followed by ``answer EOS``; the loss mask
covers the answer and EOS only, so fine-tuning is measured by exact-match
accuracy on held-out prompts.
"""

from __future__ import annotations

import string
from typing import NamedTuple, Optional, Sequence

import numpy as np

from blockllm_jax.data._bytes import encode_many
from blockllm_jax.data._bytes import resolve_tokenizer


def _reverse(rng):
  word = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 7)))
  return f"reverse {word}", word[::-1]


def _sort_digits(rng):
  digits = "".join(rng.choice(list(string.digits), rng.integers(3, 7)))
  return f"sort {digits}", "".join(sorted(digits))


def _add(rng):
  a, b = rng.integers(0, 100, 2)
  return f"add {a}+{b}", str(a + b)


def _upper(rng):
  word = "".join(rng.choice(list(string.ascii_lowercase), rng.integers(3, 7)))
  return f"upper {word}", word.upper()


TASKS: dict = {"reverse": _reverse, "sort": _sort_digits, "add": _add,
               "upper": _upper}


# Draws of an already-seen prompt in a row after which the chosen tasks are
# taken to have no new prompts left (the smallest, "add", has 10,000).
_MAX_REPEATS = 10_000

# Between prompt and answer when the tokenizer has no separator token.
TEXT_SEPARATOR = "\n"


class InstructionSet(NamedTuple):
  """Padded instruction examples, row ``i`` for ``answers[i]``.

  Slicing every field alike gives a subset:
  ``InstructionSet(*(x[:100] for x in examples))``.
  """

  tokens: np.ndarray  # int32[n, seq_len] BOS prompt SEP answer EOS PAD... (or chat prompt)
  loss_mask: np.ndarray  # float32[n, seq_len] 1 on answer and EOS tokens
  prompt_length: np.ndarray  # int32[n] tokens before the answer
  answers: list  # str[n]


def make_instruction_set(num: int, seq_len: Optional[int] = 24, seed: int = 0,
                         tasks=tuple(TASKS), tokenizer=None, *,
                         chat: Optional[bool] = None,
                         system: Optional[str] = None) -> InstructionSet:
  """Generates ``num`` distinct examples mixed over ``tasks``.

  Prompts never repeat, so splitting the result gives held-out prompts.
  The same ``seed`` gives the same prompts whatever the tokenizer.

  Args:
    num: number of examples.
    seq_len: padded length (prompts and answers here need at most 20 byte
      tokens; a byte-level BPE never needs more tokens than bytes; chat
      templates add their own); None uses the longest example.
    seed: random seed.
    tasks: names from :data:`TASKS` (a single name is accepted too).
    tokenizer: a :class:`Tokenizer`; None uses :class:`ByteTokenizer`.
    chat: put each prompt in the tokenizer's chat template (see
      :func:`encode_instructions`); None does so when it has one.
    system: the chat's system message; None leaves it to the template.

  Returns:
    An :class:`InstructionSet` with ``num`` rows of width ``seq_len``.

  Example:
    >>> examples = make_instruction_set(100, tasks=("add",))
    >>> examples.tokens.shape, examples.answers[0].isdigit()
    ((100, 24), True)
  """
  if isinstance(tasks, str):
    tasks = (tasks,)
  tasks = tuple(tasks)
  unknown = set(tasks) - set(TASKS)
  if unknown or not tasks:
    raise ValueError(f"Unknown tasks {sorted(unknown) or tasks}; choose from {sorted(TASKS)}.")
  rng = np.random.default_rng(seed)
  pairs, seen, repeats = [], set(), 0
  while len(pairs) < num:
    prompt, answer = TASKS[tasks[rng.integers(len(tasks))]](rng)
    if prompt in seen:
      repeats += 1
      if repeats > _MAX_REPEATS:
        raise ValueError(f"num={num} is more than the distinct prompts of tasks "
                         f"{list(tasks)}; got {len(pairs)} before they ran out.")
      continue
    repeats = 0
    seen.add(prompt)
    pairs.append((prompt, answer))
  return _encode_pairs(pairs, resolve_tokenizer(tokenizer), seq_len,
                       name="generated example", chat=chat, system=system)


def encode_instructions(pairs: Sequence, tokenizer=None,
                        seq_len: Optional[int] = None, *,
                        chat: Optional[bool] = None,
                        system: Optional[str] = None) -> InstructionSet:
  """Turns (prompt, answer) strings into a padded :class:`InstructionSet`.

  Each row is ``BOS prompt SEP answer EOS`` padded with ``pad_id``. Prompt
  and answer are encoded separately, so a BPE never merges across the
  boundary and the answer tokens are exactly ``encode(answer)``. When the
  tokenizer has no separator token (``sep_id is None``, e.g. a LLaMA
  tokenizer) the separator is ``encode("\\n")`` (:data:`TEXT_SEPARATOR`).

  With a chat template (``chat``, the default for a tokenizer whose
  ``chat_template`` is set, e.g. an instruct model's from a GGUF file) a row
  is instead the prompt as a user turn plus the template's opening of the
  assistant's reply (``tokenizer.chat_prompts``), then ``answer EOS``: the
  model learns to answer in its own chat format and to end its turn.

  Args:
    pairs: a sequence of ``(prompt, answer)`` string pairs.
    tokenizer: a :class:`Tokenizer`; None uses :class:`ByteTokenizer`.
    seq_len: padded width; None uses the longest example. A longer example
      is an error (nothing is truncated silently).
    chat: True uses the tokenizer's chat template (an error without one),
      False the ``BOS prompt SEP`` format; None uses the template when the
      tokenizer has one.
    system: the chat's system message; None leaves it to the template.

  Returns:
    An :class:`InstructionSet`: ``loss_mask`` is 1 on the answer and EOS,
    ``prompt_length`` counts the tokens up to and including the separator.

  Example:
    >>> examples = encode_instructions([("2+2", "4"), ("capital of France", "Paris")])
    >>> examples.tokens.shape
    (2, 25)
  """
  if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__len__"):
    raise ValueError(f"pairs must be a sequence of (prompt, answer) pairs; got {type(pairs).__name__}.")
  if len(pairs) == 0:
    raise ValueError("pairs is empty; need at least one (prompt, answer) pair.")
  for i, pair in enumerate(pairs):
    if (isinstance(pair, (str, bytes)) or len(pair) != 2
        or not all(isinstance(x, str) for x in pair)):
      raise ValueError(f"pairs[{i}] must be a (prompt, answer) pair of strings; got {pair!r}.")
  return _encode_pairs([tuple(p) for p in pairs], resolve_tokenizer(tokenizer), seq_len,
                       name="pairs", chat=chat, system=system)


def _prompt_tokens(pairs, tokenizer, chat, system) -> list:
  """Each row's tokens before its answer: a chat prompt, or BOS prompt SEP."""
  has_template = bool(getattr(tokenizer, "chat_template", None))
  if chat is None:
    chat = has_template
  if chat:
    if not has_template:
      raise ValueError(f"chat=True needs a tokenizer with a chat template; "
                       f"{type(tokenizer).__name__} has none.")
    return tokenizer.chat_prompts([p for p, _ in pairs], system=system)
  if system is not None:
    raise ValueError("system is a chat message; it needs chat=True (or None with "
                     "a chat template).")
  if tokenizer.sep_id is not None:
    separator = [tokenizer.sep_id]
  else:
    separator = list(tokenizer.encode(TEXT_SEPARATOR))
    if not separator:
      raise ValueError(f"The tokenizer has no sep_id and encodes {TEXT_SEPARATOR!r} "
                       "to no tokens; give it a separator token.")
  prompts = encode_many(tokenizer, [p for p, _ in pairs])
  return [[tokenizer.bos_id, *prompt, *separator] for prompt in prompts]


def _encode_pairs(pairs, tokenizer, seq_len, name, chat=None,
                  system=None) -> InstructionSet:
  """Encodes validated pairs; ``name`` says where they came from in errors."""
  prompts = _prompt_tokens(pairs, tokenizer, chat, system)
  answers = encode_many(tokenizer, [a for _, a in pairs])
  prompt_length = np.array([len(p) for p in prompts], np.int32)
  total_length = prompt_length + np.array([len(a) + 1 for a in answers], np.int32)
  longest = int(total_length.max()) if len(pairs) else 0
  if seq_len is None:
    seq_len = longest
  elif not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int or None; got {seq_len!r}.")
  elif longest > seq_len:
    i = int(np.argmax(total_length > seq_len))
    raise ValueError(
        f"seq_len={seq_len} is too short for {name}[{i}] (prompt {pairs[i][0]!r}), "
        f"which needs {total_length[i]} tokens; the longest needs {longest}. "
        "Pass a larger seq_len, or seq_len=None for the longest.")
  tokens = np.full((len(pairs), seq_len), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(pairs), seq_len), np.float32)
  for i, (prompt, answer) in enumerate(zip(prompts, answers)):
    full = [*prompt, *answer, tokenizer.eos_id]
    tokens[i, :len(full)] = full
    mask[i, prompt_length[i]:len(full)] = 1.0
  return InstructionSet(tokens, mask, prompt_length, [a for _, a in pairs])
