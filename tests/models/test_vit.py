"""ViT: shapes, annotations, errors, sharding, and equality with HF ViTModel."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.export import vit_config_to_hf, vit_params_from_hf, vit_params_to_hf
from clusjax.models import ViT
from clusjax.models.vit import CnnStem, ConvStem, PoolStem, _Conv3x3
from tests.models.test_layers import (assert_logically_annotated, assert_sharded_matches,
                                      randomize)

CFG = dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128)
IMAGE_HW = (32, 48)   # non-square on purpose: 4 x 6 = 24 patches


def _images(batch=2, hw=IMAGE_HW, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, *hw, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def boxed():
  return ViT(**CFG).init(jax.random.key(0), _images())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(boxed, dtype):
  model = ViT(**CFG, dtype=dtype)
  params = nn.unbox(boxed)
  out = model.apply(params, _images())
  assert out.shape == (2, 1 + 24, 64)
  assert out.dtype == dtype
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  if dtype == jnp.bfloat16:   # the bf16 path computes the same function, roughly
    ref = ViT(**CFG).apply(params, _images())
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.15)


def test_every_param_logically_annotated(boxed):
  assert_logically_annotated(boxed)
  p = boxed["params"]
  assert set(p) == {"patch_embed", "cls_token", "pos_embed", "block_0", "block_1", "final_norm"}
  assert p["patch_embed"]["kernel"].names == (None, None, None, "embed")
  assert p["pos_embed"].names == (None, None, "embed")
  assert p["pos_embed"].value.shape == (1, 25, 64)
  assert p["block_0"]["attn"]["key"]["kernel"].names == ("embed", "heads", "kv")
  assert p["block_0"]["mlp"]["fc1"]["kernel"].names == ("embed", "mlp")
  assert p["block_0"]["mlp"]["fc2"]["kernel"].names == ("mlp", "embed")


def test_rejects_bad_image_sizes(boxed):
  with pytest.raises(ValueError, match=r"image size 30x48 .* not divisible by patch_size=8"):
    ViT(**CFG).init(jax.random.key(0), _images(hw=(30, 48)))
  with pytest.raises(ValueError, match=r"images 32x32 give 16 patches .* initialised for 24"):
    ViT(**CFG).apply(nn.unbox(boxed), _images(hw=(32, 32)))


def test_sharded_forward_matches_unsharded(boxed):
  assert_sharded_matches(ViT(**CFG), boxed, _images(batch=4))


def test_matches_hf_vit_model(boxed):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params = randomize(nn.unbox(boxed)["params"])
  images = _images(seed=3)
  ours = np.asarray(ViT(**CFG).apply({"params": params}, images))

  state_dict = vit_params_to_hf(params, num_heads=CFG["num_heads"])
  assert "layers.0.attention.q_proj.weight" in state_dict   # transformers 5.x naming
  config = transformers.ViTConfig(**vit_config_to_hf(**CFG, image_size=IMAGE_HW),
                                  attn_implementation="eager")
  hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  with torch.no_grad():
    pixels = torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy())   # NHWC -> NCHW
    theirs = hf(pixel_values=pixels).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)

  # And back: HF state dict -> our params, unchanged.
  back = vit_params_from_hf(hf.state_dict(), num_heads=CFG["num_heads"])
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_conv_stem_tokens_and_translation_equivariance():
  """stem='conv': the same token grid as the patch stem, from 3x3 stride-2 convolutions
  (log2 P of them), and a shape moved by one patch moves its stem features by one token."""
  model = ViT(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem="conv")
  images = jnp.zeros((2, 32, 32, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  assert list(params["conv_stem"]) == [f"conv_{i}" for i in range(3)]
  assert nn.meta.unbox(params["patch_embed"]["kernel"]).shape == (1, 1, 32, 32)
  assert model.apply({"params": params}, images).shape == (2, 1 + 16, 32)
  stem = lambda x: ConvStem(8, 32).apply({"params": params["conv_stem"]}, x)  # noqa: E731
  a = np.zeros((1, 32, 32, 3), np.float32)
  a[0, 4:12, 4:12] = 1.0
  b = np.roll(a, 8, axis=2)
  fa, fb = np.asarray(stem(jnp.asarray(a))), np.asarray(stem(jnp.asarray(b)))
  np.testing.assert_allclose(fb[0, :, 1:3], fa[0, :, 0:2], atol=1e-5)
  with pytest.raises(ValueError, match="power-of-two"):
    ViT(patch_size=12, width=32, depth=1, num_heads=2, mlp_dim=64, stem="conv").init(
        jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))
  with pytest.raises(ValueError, match="stem='pixel'"):
    ViT(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem="pixel").init(
        jax.random.PRNGKey(0), images)


@pytest.mark.parametrize("kind,patch", [("pool", 4), ("pool", 16), ("cnn", 2), ("cnn", 16)])
def test_pooled_stems_tokens_and_translation_equivariance(kind, patch):
  """stem='pool' (a 4x4 patch conv, then log2(P/4) conv + 2x2 max-pool stages) and
  stem='cnn' (log2(P) such stages from full resolution) give the patch stem's token
  grid; a shape moved by one patch moves its features by one token."""
  size = 4 * patch
  model = ViT(patch_size=patch, width=32, depth=1, num_heads=2, mlp_dim=64, stem=kind)
  images = jnp.zeros((2, size, size, 3))
  params = model.init(jax.random.PRNGKey(0), images)["params"]
  n = patch.bit_length() - 1
  first, convs = ((4, 32 >> (n - 2)), n - 1) if kind == "pool" else ((3, max(32 >> (n - 1), 8)), n)
  assert list(params[f"{kind}_stem"]) == [f"conv_{i}" for i in range(convs)]
  assert nn.meta.unbox(params[f"{kind}_stem"]["conv_0"]["kernel"]).shape == (
      first[0], first[0], 3, first[1])
  assert nn.meta.unbox(params[f"{kind}_stem"][f"conv_{convs - 1}"]["kernel"]).shape[-1] == 32
  assert model.apply({"params": params}, images).shape == (2, 1 + 16, 32)
  module = {"pool": PoolStem, "cnn": CnnStem}[kind](patch, 32)
  stem = lambda x: module.apply({"params": params[f"{kind}_stem"]}, x)  # noqa: E731
  # A wide image, the shape two patches in from the left: the features it spreads through
  # the convolutions stay clear of the borders, where zero padding truncates them.
  a = np.zeros((1, size, 8 * patch, 3), np.float32)
  a[0, patch // 2:patch, 2 * patch + patch // 4:max(3 * patch - 1, 2 * patch + 1)] = (1.0, -0.5, 0.25)
  b = np.roll(a, patch, axis=2)
  fa, fb = np.asarray(stem(jnp.asarray(a))), np.asarray(stem(jnp.asarray(b)))
  assert np.abs(fa).max() > 0
  np.testing.assert_allclose(fb[0, :, 3:6], fa[0, :, 2:5], atol=1e-5)
  smallest, bad = {"pool": (4, 2), "cnn": (2, 6)}[kind]
  with pytest.raises(ValueError, match=f"stem='{kind}' needs a power-of-two patch_size >= {smallest}"):
    ViT(patch_size=bad, width=32, depth=1, num_heads=2, mlp_dim=64, stem=kind).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4 * bad, 4 * bad, 3)))


def test_stem_conv_matches_lax_convolution():
  """The pooled stems' 3x3 conv (im2col on the CPU) is nn.Conv's 'SAME' convolution."""
  x = jax.random.normal(jax.random.key(1), (2, 12, 10, 5))
  params = _Conv3x3(7).init(jax.random.key(2), x)["params"]
  params = jax.tree.map(lambda a: a + 0.1, nn.meta.unbox(params))    # a bias that is not zero
  np.testing.assert_allclose(_Conv3x3(7).apply({"params": params}, x),
                             nn.Conv(7, (3, 3)).apply({"params": params}, x), atol=1e-5)


def test_stem_max_cls_adds_the_stems_global_max_to_cls_only():
  """stem_max_cls: [CLS] out = the plain model's [CLS] + stem_max_proj(max over the stem's
  grid); the image tokens are unchanged. stem='patch' has no stem features to pool."""
  kw = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem="cnn")
  images = _images(hw=(32, 32))
  params = nn.meta.unbox(ViT(**kw, stem_max_cls=True).init(jax.random.key(0), images)["params"])
  out = ViT(**kw, stem_max_cls=True).apply({"params": params}, images)
  plain = ViT(**kw).apply({"params": {k: v for k, v in params.items() if k != "stem_max_proj"}},
                          images)
  np.testing.assert_allclose(out[:, 1:], plain[:, 1:], atol=1e-6)
  stem_max = CnnStem(8, 32).apply({"params": params["cnn_stem"]}, images).max(axis=(1, 2))
  proj = params["stem_max_proj"]
  np.testing.assert_allclose(out[:, 0], plain[:, 0] + stem_max @ proj["kernel"] + proj["bias"],
                             atol=1e-5)
  assert float(jnp.abs(out[:, 0] - plain[:, 0]).max()) > 1e-3
  with pytest.raises(ValueError, match="stem_max_cls and stem_width need a convolutional stem"):
    ViT(**{**kw, "stem": "patch"}, stem_max_cls=True).init(jax.random.key(0), images)


def test_stem_width_sets_the_stems_channels_and_patch_embed_maps_them_to_the_width():
  kw = dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, stem="cnn",
            stem_max_cls=True)
  images = _images(hw=(32, 32))
  params = nn.meta.unbox(ViT(**kw, stem_width=16).init(jax.random.key(0), images)["params"])
  # Stages end at stem_width and halve backwards, none under 8 channels.
  assert [params["cnn_stem"][f"conv_{i}"]["kernel"].shape[-1] for i in range(3)] == [8, 8, 16]
  assert params["patch_embed"]["kernel"].shape == (1, 1, 16, 32)
  assert params["stem_max_proj"]["kernel"].shape == (16, 32)
  assert ViT(**kw, stem_width=16).apply({"params": params}, images).shape == (2, 1 + 16, 32)
  # 0 = the width: the tree of a model without the option.
  default = nn.meta.unbox(ViT(**kw).init(jax.random.key(0), images)["params"])
  wide = nn.meta.unbox(ViT(**kw, stem_width=32).init(jax.random.key(0), images)["params"])
  assert jax.tree.map(np.shape, default) == jax.tree.map(np.shape, wide)
  with pytest.raises(ValueError, match="stem_max_cls and stem_width need a convolutional stem"):
    ViT(**{**kw, "stem": "patch", "stem_max_cls": False}, stem_width=16).init(
        jax.random.key(0), images)
