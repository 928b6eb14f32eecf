"""Models used by the examples and tests (the optimizers do not need them):
a Flax LLaMA, Hugging Face checkpoint import/export, GGUF import, and LoRA
adapters."""

from blockllm_jax.models._gguf import load_gguf_checkpoint
from blockllm_jax.models._gguf import settings_from_gguf
from blockllm_jax.models._hf import hf_config_dict
from blockllm_jax.models._hf import load_hf_checkpoint
from blockllm_jax.models._hf import save_hf_checkpoint
from blockllm_jax.models._hf import settings_from_hf_config
from blockllm_jax.models._lora import add_lora
from blockllm_jax.models._lora import is_lora_path
from blockllm_jax.models._lora import lora_mask
from blockllm_jax.models._lora import merge_lora
from blockllm_jax.models.llama import LORA_TARGETS
from blockllm_jax.models.llama import Llama3RopeScaling
from blockllm_jax.models.llama import LlamaForCausalLM
from blockllm_jax.models.llama import LlamaSettings
from blockllm_jax.models.llama import causal_lm_loss
from blockllm_jax.models.llama import REMAT_POLICIES
from blockllm_jax.models.llama import rope_frequencies
from blockllm_jax.models.llama import stack_layers
from blockllm_jax.models.llama import unstack_layers

__all__ = (
    "LORA_TARGETS", "Llama3RopeScaling", "LlamaForCausalLM", "LlamaSettings",
    "add_lora", "causal_lm_loss", "hf_config_dict", "is_lora_path",
    "load_gguf_checkpoint", "load_hf_checkpoint", "lora_mask", "merge_lora", "rope_frequencies",
    "save_hf_checkpoint", "settings_from_gguf", "settings_from_hf_config", "REMAT_POLICIES",
    "stack_layers", "unstack_layers",
)
