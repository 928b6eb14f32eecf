"""blockllm_jax: memory-efficient LLM training by block coordinate descent.

Optax gradient transformations that keep Adam moments only for a small,
changing subset of the parameters.
"""

from blockllm_jax._blockllm import blockllm
from blockllm_jax._blockllm import scale_by_blockllm
from blockllm_jax._blockllm import ScaleByBlockLLMState
from blockllm_jax._introspect import reselection_count
from blockllm_jax._introspect import selected
from blockllm_jax._layout import DEFAULT_INELIGIBLE_PATTERN
from blockllm_jax._layout import default_eligible
from blockllm_jax._memory import compiled_memory
from blockllm_jax._memory import state_bytes

__version__ = "0.1.0"

__all__ = (
    "blockllm",
    "compiled_memory",
    "default_eligible",
    "DEFAULT_INELIGIBLE_PATTERN",
    "reselection_count",
    "scale_by_blockllm",
    "ScaleByBlockLLMState",
    "selected",
    "state_bytes",
)
