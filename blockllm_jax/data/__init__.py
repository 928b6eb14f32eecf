"""Offline data: a byte tokenizer, an embedded corpus, instruction tasks."""

from blockllm_jax.data._bytes import ByteTokenizer
from blockllm_jax.data._bytes import embedded_corpus
from blockllm_jax.data._bytes import language_model_batches
from blockllm_jax.data._instructions import InstructionSet
from blockllm_jax.data._instructions import make_instruction_set
from blockllm_jax.data._instructions import TASKS

__all__ = ("ByteTokenizer", "embedded_corpus", "language_model_batches",
           "InstructionSet", "make_instruction_set", "TASKS")
