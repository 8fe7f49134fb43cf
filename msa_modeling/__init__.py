"""Memory Sparse Attention models in Hugging Face form.

Importing this package registers `model_type="msa"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, so `AutoModelForCausalLM.from_pretrained(path)` loads MSA checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_msa import MSAConfig
from .layout import PackedLayout, build_packed_layout, compute_position_ids
from .modeling_msa import MSACausalLMOutput, MSAForCausalLM, MSAModel

AutoConfig.register(MSAConfig.model_type, MSAConfig, exist_ok=True)
AutoModel.register(MSAConfig, MSAModel, exist_ok=True)
AutoModelForCausalLM.register(MSAConfig, MSAForCausalLM, exist_ok=True)

__all__ = [
    "MSACausalLMOutput",
    "MSAConfig",
    "MSAForCausalLM",
    "MSAModel",
    "PackedLayout",
    "build_packed_layout",
    "compute_position_ids",
]
