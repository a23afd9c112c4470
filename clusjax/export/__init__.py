"""Export and import: clusjax params <-> Hugging Face / PyTorch state dicts.

hf_convert is pure numpy (no torch import), so conversions work in a
JAX-only install; writing safetensors files is left to the caller.
"""
from clusjax.export.hf_convert import (bert_config_to_hf, bert_params_from_hf,
                                       bert_params_to_hf, vit_config_to_hf, vit_params_from_hf,
                                       vit_params_to_hf)

__all__ = [
    "bert_config_to_hf",
    "bert_params_from_hf",
    "bert_params_to_hf",
    "vit_config_to_hf",
    "vit_params_from_hf",
    "vit_params_to_hf",
]
