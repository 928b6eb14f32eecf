"""Honest memory measurements: state bytes and compiled step memory."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np


def state_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of ``tree`` (e.g. an optimizer state).

  Works for arrays and ``jax.ShapeDtypeStruct`` leaves.
  """
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(
          leaf.dtype).itemsize
  return total


class CompiledMemory(NamedTuple):
  """XLA's memory analysis of a compiled function, in bytes."""

  argument: int
  output: int
  temp: int
  alias: int

  @property
  def total(self) -> int:
    """Bytes live during a call: arguments + outputs + temporaries - aliased."""
    return self.argument + self.output + self.temp - self.alias

  @classmethod
  def of(cls, compiled) -> "CompiledMemory":
    """Reads the analysis of an already compiled function
    (``jax.jit(f).lower(*args).compile()``), e.g. the one a training loop
    then runs, so that it is compiled only once."""
    analysis = compiled.memory_analysis()
    return cls(argument=int(analysis.argument_size_in_bytes),
               output=int(analysis.output_size_in_bytes),
               temp=int(analysis.temp_size_in_bytes),
               alias=int(analysis.alias_size_in_bytes))


def compiled_memory(fn, *args, donate_argnums=(), **jit_kwargs) -> CompiledMemory:
  """Compiles ``fn(*args)`` with ``jax.jit`` and reads its memory analysis.

  Args:
    fn: the function (e.g. a train step).
    *args: example arguments (arrays or ``jax.ShapeDtypeStruct``).
    donate_argnums: arguments whose buffers the outputs may reuse, as in a
      real training loop (params and optimizer state).
    **jit_kwargs: passed to ``jax.jit``.

  Returns:
    A :class:`CompiledMemory`.
  """
  return CompiledMemory.of(jax.jit(fn, donate_argnums=donate_argnums,
                                   **jit_kwargs).lower(*args).compile())
