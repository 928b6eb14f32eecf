"""Models used by the examples and tests (the optimizers do not need them)."""

from blockllm_jax.models.llama import LlamaForCausalLM
from blockllm_jax.models.llama import LlamaSettings
from blockllm_jax.models.llama import causal_lm_loss

__all__ = ("LlamaForCausalLM", "LlamaSettings", "causal_lm_loss")
