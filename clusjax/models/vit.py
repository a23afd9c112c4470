"""Image encoder: a Vision Transformer with the architecture of HF `ViTModel`.

    images [B, H, W, 3] float (normalised) --patch conv (or conv stem)--> [B, N, W]
    --> [CLS] + tokens + position embeddings --> depth x pre-LN block
    --> final LayerNorm --> last_hidden_state [B, 1+N, W]

Same layers, order and numerics as transformers 5.23 `ViTModel` without its
pooler, so `clusjax.export.hf_convert` moves weights both ways by re-keying
and transposing alone.

Params (top level): patch_embed {kernel [P, P, 3, W], bias [W]},
cls_token [1, 1, W], pos_embed [1, 1+N, W], block_0 .. block_{depth-1}
(see layers.TransformerBlock), final_norm {scale, bias}.

stem="conv" (Xiao et al. 2021, "Early convolutions help transformers see better")
replaces the patch projection by log2(P) 3x3 stride-2 convolutions, each with a
GELU (channels W/2^(n-1) ... W), then a 1x1 projection
(`patch_embed`, kernel [1, 1, W, W]): the same tokens, but each sees its patch
through local, translation-equivariant filters, so shape is learned from little
data. stem="pool" (PoolStem) adds what lets a small CNN tell shapes apart within
a few hundred steps: ReLU features max-pooled 2x2, so a shape a few pixels off
gives the same token; stem="cnn" (CnnStem) is that from full resolution, and
stem_max_cls adds the stem's global max to the [CLS] output. stem_width sets the
channels of a convolutional stem's last stage (default: the ViT width), which
`patch_embed` then maps to the width (at patch 8 and width 128, a 64-channel end
makes the tower's forward + backward 0.64x as long; docs/experiments.md, Figures on
shapes v2). HF `ViTModel` has none of these stems: export refuses them.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from clusjax.models.layers import (ACT_EMBED, LayerNorm, TransformerBlock, constrain,
                                   default_init, run_layers)

Dtype = Any


def _stem_conv(features, window, stride, padding, dtype, name):
  """A square conv of a convolutional stem: He-normal kernel, zero bias, params float32."""
  return nn.Conv(features, (window, window), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.he_normal(), (None, None, None, None)),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))


def _log2_patch(patch_size, smallest, stem):
  """log2(patch_size), checking that it is a power of two >= `smallest` (stem: its name)."""
  n = patch_size.bit_length() - 1
  if patch_size != 1 << n or patch_size < smallest:
    raise ValueError(f"ViT: stem={stem!r} needs a power-of-two patch_size >= {smallest}; "
                     f"got {patch_size}.")
  return n


class ConvStem(nn.Module):
  """[B, H, W, 3] -> [B, H/P, W/P, width]: log2(P) 3x3 stride-2 conv + GELU (ViT stem='conv').

  No normalisation between them: a per-pixel LayerNorm would scale the flat
  background of these images (and its noise) up to the contrast of an edge, and
  BatchNorm would add state; the pre-LN blocks normalise the tokens anyway.
  Params conv_0 .. conv_{n-1} {kernel [3, 3, C_in, C], bias [C]}.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = _log2_patch(self.patch_size, 2, "conv")
    for i, features in enumerate(_stage_channels(self.width, n)):
      x = nn.gelu(_stem_conv(features, 3, 2, "SAME", self.dtype, f"conv_{i}")(x))
    return x


class _Conv3x3(nn.Module):
  """A 3x3 stride-1 'SAME' conv of a pooled stem (params as nn.Conv's: kernel, bias).

  On the CPU it runs as one matmul over the nine shifted copies of the input
  (im2col): XLA:CPU's own convolutions at these sizes take ~2x longer, forward and
  backward (benchmarks/stems.py). Elsewhere it is lax's convolution.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.he_normal(), (None, None, None, None)), (3, 3, c_in, self.features),
        jnp.float32).astype(self.dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                      (self.features,), jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    if jax.default_backend() == "cpu":
      h, w = x.shape[1:3]
      xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
      return cols @ kernel.reshape(9 * c_in, self.features) + bias
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def _max_pool_2x2(x):
  """2x2 max pooling, stride 2, of [B, H, W, C] with even H, W (a reshape and a max:
  its gradient is cheaper on XLA:CPU than reduce_window's select-and-scatter)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _pooled_stages(x, channels, dtype, first):
  """(3x3 conv + ReLU + 2x2 max pool) per entry of `channels`; convs conv_{first}, ..."""
  for i, features in enumerate(channels):
    x = _max_pool_2x2(nn.relu(_Conv3x3(features, dtype, name=f"conv_{first + i}")(x)))
  return x


def _stage_channels(width, n):
  """Channels of n stages ending at `width`, halving backwards: W/2^(n-1) ... W (>= 8)."""
  return [max(width >> (n - 1 - i), 8) for i in range(n)]


class PoolStem(nn.Module):
  """[B, H, W, 3] -> [B, H/P, W/P, width]: a 4x4 stride-4 conv + ReLU, then log2(P/4)
  x (3x3 conv + ReLU + 2x2 max pool) (ViT stem='pool'; n = log2(P/4), channels
  W/2^n ... W).

  Max pooling gives the local translation invariance a shape recogniser needs: on
  64 px shapes v2, the tiny ViT with this stem learns kind from the noun codes alone
  to 0.67 (the patch stem 0.34; benchmarks/prompt_labels.py, 300 x 96), at a ninth of
  the cost of full-resolution convolutions on XLA:CPU. No normalisation, as ConvStem.
  Params conv_0 .. conv_n {kernel, bias}.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = _log2_patch(self.patch_size, 4, "pool") - 2   # pooled stages after the 4x4 patch conv
    x = nn.relu(_stem_conv(max(self.width >> n, 8), 4, 4, "VALID", self.dtype, "conv_0")(x))
    return _pooled_stages(x, _stage_channels(self.width, n + 1)[1:], self.dtype, 1)


class CnnStem(nn.Module):
  """[B, H, W, 3] -> [B, H/P, W/P, width]: log2(P) x (3x3 conv + ReLU + 2x2 max pool)
  from full resolution (ViT stem='cnn', LeNet-like; channels W/2^(n-1) ... W).

  The pooled stem without its 4x4 patch conv: edges are seen at full resolution.
  With the stem's max over the grid added to [CLS] (ViT stem_max_cls), a supervised
  probe on one-shape v2 images learns kind to 0.89 (0.94 on the transfer renderer)
  in 300 x 96 steps, against 0.79 / 0.79 for stem='pool' (benchmarks/RESULTS.md).
  Params conv_0 .. conv_{n-1} {kernel, bias}.
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n = _log2_patch(self.patch_size, 2, "cnn")
    return _pooled_stages(x, _stage_channels(self.width, n), self.dtype, 0)


class ViT(nn.Module):
  """ViT encoder returning all tokens after the final LayerNorm.

  No pooler: Clus projects the CLS token with its own ITC head, and an unused
  tanh pooler would only collect weight decay. Export targets
  `ViTModel(config, add_pooling_layer=False)` (see export/hf_convert.py).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32          # compute dtype; params stay float32
  layer_norm_eps: float = 1e-12       # HF ViTConfig default
  remat: str = "none"                 # config.remat: activation checkpointing of the blocks
  scan_layers: bool = False           # config.scan_layers: the blocks as one lax.scan
  stem: str = "patch"                 # patch (ViT) | conv | pool | cnn (module docstring)
  # [CLS] out += a linear map of the stem's features max-pooled over the grid (not stem=patch).
  stem_max_cls: bool = False
  # Channels of a convolutional stem's last stage (0 = width); patch_embed maps them to width.
  stem_width: int = 0

  @nn.compact
  def __call__(self, images, deterministic=True):
    """Encodes images.

    Args:
      images: float [B, H, W, 3], already normalised as HF ViTImageProcessor
        does ((x / 255 - 0.5) / 0.5). H and W must be multiples of patch_size;
        the position-embedding length is fixed by the image size at init.
      deterministic: False applies dropout with the 'dropout' rng.

    Returns:
      last_hidden_state [B, 1 + (H/P)*(W/P), width] in self.dtype; token 0 is CLS.
    """
    if images.ndim != 4:
      raise ValueError(f"ViT expects images [B, H, W, C]; got shape {images.shape}.")
    b, h, w, _ = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f"ViT: image size {h}x{w} (images.shape={images.shape}) is not divisible by "
          f"patch_size={p}; resize or crop the images to a multiple of {p}.")

    x = images.astype(self.dtype)
    stems = {"conv": (ConvStem, "conv_stem"), "pool": (PoolStem, "pool_stem"),
             "cnn": (CnnStem, "cnn_stem")}
    if self.stem in stems:
      stem, name = stems[self.stem]
      x = stem(self.patch_size, self.stem_width or self.width, self.dtype, name=name)(x)
      stem_max = x.max(axis=(1, 2))
      p_embed = 1
    elif self.stem == "patch":
      if self.stem_max_cls or self.stem_width:
        raise ValueError("ViT: stem_max_cls and stem_width need a convolutional stem (conv, "
                         "pool or cnn); stem='patch' has no feature map.")
      p_embed = p
    else:
      raise ValueError(f"ViT: stem={self.stem!r} is unknown; use 'patch', 'conv', 'pool' or "
                       "'cnn'.")
    # A stride-P conv is a linear map of each flattened P x P x 3 patch (HF's
    # Conv2d projection); row-major flatten of the patch grid as HF's flatten(2).
    x = nn.Conv(
        self.width, (p_embed, p_embed), strides=(p_embed, p_embed), padding="VALID",
        dtype=self.dtype, param_dtype=jnp.float32, name="patch_embed",
        kernel_init=nn.with_logical_partitioning(default_init, (None, None, None, "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
    )(x)
    x = x.reshape(b, (h // p) * (w // p), self.width)

    cls = self.param("cls_token", nn.with_logical_partitioning(default_init, (None, None, "embed")),
                     (1, 1, self.width), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)

    n = x.shape[1]
    if self.has_variable("params", "pos_embed"):
      # Flax would raise a bare shape-mismatch error; name the image size instead.
      init_n = nn.meta.unbox(self.get_variable("params", "pos_embed")).shape[1]
      if init_n != n:
        raise ValueError(
            f"ViT: images {h}x{w} give {n - 1} patches of {p}px but the model was "
            f"initialised for {init_n - 1} patches; use the image size from init.")
    pos = self.param("pos_embed", nn.with_logical_partitioning(default_init, (None, None, "embed")),
                     (1, n, self.width), jnp.float32)
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = constrain(x, ACT_EMBED)

    block = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, pre_norm=True,
                 dropout=self.dropout, dtype=self.dtype, layer_norm_eps=self.layer_norm_eps)
    x = run_layers(self, {"block": (TransformerBlock, block, (3,), "block_{}")},
                   range(self.depth), lambda x, b: b["block"](x, None, deterministic), x,
                   deterministic=deterministic, remat=self.remat, scan=self.scan_layers)
    x = LayerNorm(self.layer_norm_eps, self.dtype, name="final_norm")(x)
    if self.stem_max_cls:
      # The stem's global max (which shapes are anywhere in the image) straight to [CLS]:
      # kind 0.89 vs 0.73 without it in the supervised probe (CnnStem's docstring).
      extra = nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="stem_max_proj",
                       kernel_init=nn.with_logical_partitioning(default_init, (None, "embed")),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))
      x = x.at[:, 0].add(extra(stem_max))
    return constrain(x, ACT_EMBED)
