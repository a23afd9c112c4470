"""Clus: ViT image encoder + BERT text encoder with ITC projection heads.

    images [B, H, W, 3] uint8 --ViT--> CLS --vision_proj--> L2 norm --> [B, E]
    ids, mask [B, L]          --BERT--> CLS --text_proj--> L2 norm  --> [B, E]

The towers have the architecture of Hugging Face ViTModel / BertModel so
weights move to and from PyTorch by re-keying (clusjax/export).
"""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from clusjax.models.bert import BertEncoder
from clusjax.models.vit import ViT

# HF ViTImageProcessor's defaults: x / 255, then (x - 0.5) / 0.5.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def preprocess_images(images):
  """uint8 [B, H, W, 3] -> float32 in [-1, 1], as HF ViTImageProcessor does."""
  return (images.astype(jnp.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD


def _l2_normalize(x, eps=1e-12):
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class ClusModel(nn.Module):
  """The dual encoder; `__call__` returns the normalised ITC features."""
  config: ml_collections.FrozenConfigDict   # the run config's `model` section
  vocab_size: int
  max_text_len: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.vision = ViT(
        patch_size=cfg.vision.patch_size, width=cfg.vision.width, depth=cfg.vision.depth,
        num_heads=cfg.vision.num_heads, mlp_dim=cfg.vision.mlp_dim, dropout=cfg.dropout,
        dtype=self.dtype)
    self.text = BertEncoder(
        vocab_size=self.vocab_size, width=cfg.text.width, depth=cfg.text.depth,
        num_heads=cfg.text.num_heads, mlp_dim=cfg.text.mlp_dim, max_len=self.max_text_len,
        dropout=cfg.dropout, dtype=self.dtype)
    self.vision_proj = self._projection("vision_proj")
    self.text_proj = self._projection("text_proj")
    self.temperature = self.param(
        "temperature", nn.with_logical_partitioning(
            nn.initializers.constant(cfg.temperature_init), ()), (), jnp.float32)

  def _projection(self, name):
    return nn.Dense(
        self.config.embed_dim, dtype=self.dtype, param_dtype=jnp.float32, name=name,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "proj")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("proj",)))

  def encode_image(self, images, deterministic=True):
    """uint8 [B, H, W, 3] -> (tokens [B, 1+N, Wv], features [B, E] float32, unit norm)."""
    tokens = self.vision(preprocess_images(images).astype(self.dtype),
                         deterministic=deterministic)
    return tokens, _l2_normalize(self.vision_proj(tokens[:, 0]))

  def encode_text(self, ids, mask, deterministic=True):
    """ids int32 [B, L], mask bool [B, L] -> (tokens [B, L, Wt], features [B, E])."""
    tokens = self.text(ids, mask, deterministic=deterministic)
    return tokens, _l2_normalize(self.text_proj(tokens[:, 0]))

  def __call__(self, images, ids, mask, deterministic=True):
    _, image_feats = self.encode_image(images, deterministic)
    _, text_feats = self.encode_text(ids, mask, deterministic)
    return dict(image_feats=image_feats, text_feats=text_feats,
                temperature=self.temperature)


# The embedding table is padded to a multiple of this so that it splits evenly
# over the tensor axis (and aligns with TPU/GPU tiles); padded ids never occur.
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size):
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_model(config, vocab_size):
  """The run config -> ClusModel (compute dtype from config.dtype)."""
  return ClusModel(config=ml_collections.FrozenConfigDict(config.model),
                   vocab_size=padded_vocab_size(vocab_size),
                   max_text_len=config.data.max_text_len,
                   dtype=jnp.dtype(config.dtype))
