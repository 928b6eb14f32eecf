"""blockllm_jax: memory-efficient LLM training by block coordinate descent.

Optax gradient transformations that keep Adam moments only for a small,
changing subset of the parameters: BlockLLM (selection by gradient norm and
loss), BAdam (one block of layers at a time on a schedule) and BREAD (BAdam
with a correction of the inactive blocks).
"""

from blockllm_jax._badam import badam
from blockllm_jax._badam import scale_by_badam
from blockllm_jax._badam import ScaleByBAdamState
from blockllm_jax._blockllm import blockllm
from blockllm_jax._blockllm import scale_by_blockllm
from blockllm_jax._blockllm import ScaleByBlockLLMState
from blockllm_jax._blocks import block_partition
from blockllm_jax._blocks import layer_blocks
from blockllm_jax._bread import bread
from blockllm_jax._bread import scale_by_bread
from blockllm_jax._introspect import active_block
from blockllm_jax._introspect import reselection_count
from blockllm_jax._introspect import selected
from blockllm_jax._lean import lean_value_and_grad
from blockllm_jax._lean import LeanGradients
from blockllm_jax._lean import LeanResult
from blockllm_jax._layout import DEFAULT_INELIGIBLE_PATTERN
from blockllm_jax._layout import default_eligible
from blockllm_jax._layout import LayerKey
from blockllm_jax._memory import compiled_memory
from blockllm_jax._memory import CompiledMemory
from blockllm_jax._memory import state_bytes
from blockllm_jax._rounding import stochastic_rounding
from blockllm_jax._sharding import fsdp_sharding
from blockllm_jax._sharding import reshard_state
from blockllm_jax._sharding import state_sharding
from blockllm_jax._rounding import StochasticRoundingState

__version__ = "0.1.0"

__all__ = (
    "active_block",
    "badam",
    "block_partition",
    "blockllm",
    "bread",
    "compiled_memory",
    "CompiledMemory",
    "default_eligible",
    "fsdp_sharding",
    "DEFAULT_INELIGIBLE_PATTERN",
    "layer_blocks",
    "LayerKey",
    "lean_value_and_grad",
    "LeanGradients",
    "LeanResult",
    "reselection_count",
    "reshard_state",
    "scale_by_badam",
    "scale_by_blockllm",
    "scale_by_bread",
    "ScaleByBAdamState",
    "ScaleByBlockLLMState",
    "selected",
    "state_bytes",
    "state_sharding",
    "stochastic_rounding",
    "StochasticRoundingState",
)
