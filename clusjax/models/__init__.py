"""Flax (Linen) models: encoders and the blocks they share.

ViT and BertEncoder have the architectures of HF ViTModel / BertModel
(weights move by re-keying, see clusjax/export/hf_convert.py). The Clus
dual encoder lives in clus.py.
"""
from clusjax.models.bert import BertEncoder
from clusjax.models.layers import (DenseGeneral, Embed, LayerNorm, Mlp, MultiHeadAttention,
                                   TransformerBlock, dense)
from clusjax.models.longnet import LongNet
from clusjax.models.vit import ViT

__all__ = [
    "BertEncoder",
    "DenseGeneral",
    "Embed",
    "LayerNorm",
    "LongNet",
    "Mlp",
    "MultiHeadAttention",
    "TransformerBlock",
    "ViT",
    "dense",
]
