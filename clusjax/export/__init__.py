"""Export and import: clusjax params <-> Hugging Face / PyTorch.

hf_convert is pure numpy (no torch import), so conversions work in a
JAX-only install. export_pytorch writes a workdir as transformers
directories (safetensors, no torch needed); import_bert reads a BERT
checkpoint into the Flax text encoder (torch only for .bin files).
"""
from clusjax.export.hf_convert import (bert_config_to_hf, bert_params_from_hf,
                                       bert_params_to_hf, vit_config_to_hf, vit_params_from_hf,
                                       vit_params_to_hf)
from clusjax.export.import_bert import ImportedBert, import_bert
from clusjax.export.pytorch import export_pytorch

__all__ = [
    "ImportedBert",
    "bert_config_to_hf",
    "bert_params_from_hf",
    "bert_params_to_hf",
    "export_pytorch",
    "import_bert",
    "vit_config_to_hf",
    "vit_params_from_hf",
    "vit_params_to_hf",
]
