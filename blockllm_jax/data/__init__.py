"""Offline data: tokenizers, corpora, language-model batches, instruction sets.

Every data function takes ``tokenizer=None`` (a :class:`ByteTokenizer`) or
any :class:`Tokenizer`, e.g. a BPE from :func:`train_bpe_tokenizer` or a
checkpoint's tokenizer from :func:`load_tokenizer`. Local files are read
with :func:`load_text` and :func:`load_instructions`.
"""

from blockllm_jax.data._bpe import HFTokenizer
from blockllm_jax.data._bpe import load_tokenizer
from blockllm_jax.data._bpe import train_bpe_tokenizer
from blockllm_jax.data._bytes import ByteTokenizer
from blockllm_jax.data._bytes import embedded_corpus
from blockllm_jax.data._bytes import language_model_batches
from blockllm_jax.data._bytes import Tokenizer
from blockllm_jax.data._files import load_instructions
from blockllm_jax.data._files import load_text
from blockllm_jax.data._instructions import encode_instructions
from blockllm_jax.data._instructions import InstructionSet
from blockllm_jax.data._instructions import make_instruction_set
from blockllm_jax.data._instructions import TASKS

__all__ = ("Tokenizer", "ByteTokenizer", "HFTokenizer", "train_bpe_tokenizer",
           "load_tokenizer", "embedded_corpus", "language_model_batches",
           "load_text", "load_instructions", "InstructionSet", "make_instruction_set",
           "encode_instructions", "TASKS")
