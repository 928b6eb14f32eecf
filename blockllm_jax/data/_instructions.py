"""A synthetic instruction task with one exact answer per prompt.

Each example is ``BOS prompt SEP answer EOS`` right-padded with PAD; the loss
mask covers the answer and EOS only, so fine-tuning is measured by
exact-match accuracy on held-out prompts.
"""

from __future__ import annotations

import string
from typing import Callable, NamedTuple

import numpy as np

from blockllm_jax.data._bytes import ByteTokenizer


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


class InstructionSet(NamedTuple):
  tokens: np.ndarray  # int32[n, seq_len] BOS prompt SEP answer EOS PAD...
  loss_mask: np.ndarray  # float32[n, seq_len] 1 on answer and EOS tokens
  prompt_length: np.ndarray  # int32[n] tokens up to and including SEP
  answers: list  # str[n]


def make_instruction_set(num: int, seq_len: int = 24, seed: int = 0,
                         tasks=tuple(TASKS)) -> InstructionSet:
  """Generates ``num`` distinct examples mixed over ``tasks``.

  Prompts never repeat, so splitting the result gives held-out prompts.

  Args:
    num: number of examples.
    seq_len: padded length (prompts and answers here need at most 20).
    seed: random seed.
    tasks: names from :data:`TASKS`.
  """
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise ValueError(f"Unknown tasks {sorted(unknown)}; choose from {sorted(TASKS)}.")
  tok = ByteTokenizer()
  rng = np.random.default_rng(seed)
  tokens = np.full((num, seq_len), tok.PAD, np.int32)
  mask = np.zeros((num, seq_len), np.float32)
  prompt_length = np.zeros(num, np.int32)
  answers, seen = [], set()
  while len(answers) < num:
    prompt, answer = TASKS[tasks[rng.integers(len(tasks))]](rng)
    if prompt in seen:
      continue
    seen.add(prompt)
    ids = [tok.BOS] + tok.encode(prompt) + [tok.SEP]
    full = ids + tok.encode(answer) + [tok.EOS]
    if len(full) > seq_len:
      raise ValueError(f"seq_len={seq_len} is too short for {prompt!r}.")
    i = len(answers)
    tokens[i, :len(full)] = full
    mask[i, len(ids):len(full)] = 1.0
    prompt_length[i] = len(ids)
    answers.append(answer)
  return InstructionSet(tokens, mask, prompt_length, answers)
