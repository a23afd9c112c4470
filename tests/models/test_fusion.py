"""Fusion encoders: co-attention (Eq. 2-4) and self-attention, and Clus heads."""
import jax
import jax.numpy as jnp
import ml_collections
import flax.linen as nn
import numpy as np
import pytest

from clusjax.models.clus import ClusModel
from clusjax.models.fusion import FusionEncoder, self_attention_depth
from clusjax.models.layers import TransformerBlock
from tests.models.test_layers import assert_logically_annotated, randomize

B, LI, LT, E = 3, 5, 4, 16


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  img = rng.normal(size=(B, LI, E)).astype(np.float32)
  txt = rng.normal(size=(B, LT, E)).astype(np.float32)
  mask = np.ones((B, LT), bool)
  mask[0, 2:] = False
  return img, txt, mask


def _count(params):
  return sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("kind", ["co_attention", "self_attention"])
def test_partial_outputs_equal_the_full_ones(kind):
  img, txt, mask = _inputs()
  fusion = FusionEncoder(kind, depth=2, num_heads=2, mlp_dim=32)
  params = randomize(nn.unbox(fusion.init(jax.random.key(0), img, txt, mask))["params"])
  full_img, full_txt = fusion.apply({"params": params}, img, txt, mask)
  assert full_img.shape == (B, LI, E) and full_txt.shape == (B, LT, E)
  cls_img, cls_txt = fusion.apply({"params": params}, img, txt, mask, outputs="cls")
  np.testing.assert_allclose(cls_img, full_img[:, :1], atol=1e-5)
  np.testing.assert_allclose(cls_txt, full_txt[:, :1], atol=1e-5)
  none, text_only = fusion.apply({"params": params}, img, txt, mask, outputs="text")
  assert none is None
  np.testing.assert_allclose(text_only, full_txt, atol=1e-5)


def test_co_attention_streams_read_each_other():
  img, txt, mask = _inputs()
  fusion = FusionEncoder("co_attention", depth=1, num_heads=2, mlp_dim=32)
  params = randomize(nn.unbox(fusion.init(jax.random.key(0), img, txt, mask))["params"])
  assert set(params) == {"image_block_0", "text_block_0"}
  assert {"attn", "cross_attn", "mlp", "norm1", "norm_cross", "norm2"} <= set(params["text_block_0"])
  out_img, out_txt = (np.asarray(x) for x in fusion.apply({"params": params}, img, txt, mask))
  img2 = img.copy()
  img2[1] += 1.0
  out_txt2 = np.asarray(fusion.apply({"params": params}, img2, txt, mask)[1])
  # Text of example 1 sees its own image (cross-attention) and no other example's.
  assert not np.allclose(out_txt2[1], out_txt[1])
  np.testing.assert_allclose(out_txt2[[0, 2]], out_txt[[0, 2]], atol=1e-6)
  # Padded text tokens are not attended to: changing them changes no image output.
  txt2 = txt.copy()
  txt2[0, 2:] += 5.0
  out_img2, _ = fusion.apply({"params": params}, img, txt2, mask)
  np.testing.assert_allclose(out_img2, out_img, atol=1e-5)


def test_self_attention_has_about_the_co_attention_parameter_count():
  width, mlp = 64, 256
  img = np.zeros((1, LI, width), np.float32)
  txt = np.zeros((1, LT, width), np.float32)
  mask = np.ones((1, LT), bool)
  counts = {}
  for kind in ("co_attention", "self_attention"):
    fusion = FusionEncoder(kind, depth=3, num_heads=4, mlp_dim=mlp)
    counts[kind] = _count(jax.eval_shape(fusion.init, jax.random.key(0), img, txt, mask))
  assert abs(counts["self_attention"] / counts["co_attention"] - 1) < 0.05, counts
  assert self_attention_depth(3, width, mlp) > 3


def test_num_queries_and_cross_attention_checks():
  img, txt, mask = _inputs()
  block = TransformerBlock(num_heads=2, mlp_dim=32, pre_norm=True, cross_attention=True)
  params = randomize(nn.unbox(block.init(jax.random.key(0), txt, mask, context=img))["params"])
  full = block.apply({"params": params}, txt, mask, context=img)
  part = block.apply({"params": params}, txt, mask, context=img, num_queries=2)
  np.testing.assert_allclose(part, full[:, :2], atol=1e-5)
  with pytest.raises(ValueError, match="cross_attention=True"):
    block.apply({"params": params}, txt, mask)


def test_clus_heads_shapes_and_annotations():
  cfg = ml_collections.ConfigDict(dict(
      vision=dict(patch_size=8, width=E, depth=1, num_heads=2, mlp_dim=32),
      text=dict(width=E, depth=1, num_heads=2, mlp_dim=32),
      embed_dim=8, dropout=0.0, temperature_init=0.06, fusion="co_attention", fusion_depth=1))
  model = ClusModel(ml_collections.FrozenConfigDict(cfg), vocab_size=128, max_text_len=LT,
                    num_prototypes=10)
  images = np.zeros((B, 16, 16, 3), np.uint8)
  ids = np.full((B, LT), 7, np.int32)
  mask = np.ones((B, LT), bool)
  boxed = model.init(jax.random.key(0), images, ids, mask)["params"]
  assert_logically_annotated(boxed)
  params = nn.unbox(boxed)
  assert {"fusion", "itm_head", "mlm_decoder", "prototypes"} <= set(params)
  out = model.apply({"params": params}, images, ids, mask)
  np.testing.assert_allclose(np.linalg.norm(out["prototypes"], axis=0), 1.0, rtol=1e-5)
  assert out["prototypes"].shape == (8, 10)
  itm = model.apply({"params": params}, out["image_tokens"], out["text_tokens"], mask,
                    method=ClusModel.itm_logits)
  assert itm.shape == (B, 2) and itm.dtype == jnp.float32
  mlm = model.apply({"params": params}, out["image_tokens"], ids, mask,
                    method=ClusModel.mlm_logits)
  assert mlm.shape == (B, LT, 128)


@pytest.mark.parametrize("enabled", [True, False])
def test_itm_reads_the_cluster_tokens_through_longnet(enabled):
  cfg = ml_collections.ConfigDict(dict(
      vision=dict(patch_size=8, width=E, depth=1, num_heads=2, mlp_dim=32),
      text=dict(width=E, depth=1, num_heads=2, mlp_dim=32),
      embed_dim=8, dropout=0.0, temperature_init=0.06, fusion="co_attention", fusion_depth=1))
  longnet = ml_collections.FrozenConfigDict(dict(
      enabled=enabled, width=8, depth=1, num_heads=2, mlp_dim=16, segment_lengths=(4, 8),
      dilation_rates=(1, 2), implementation="xla"))
  k_max = 10
  model = ClusModel(ml_collections.FrozenConfigDict(cfg), vocab_size=128, max_text_len=LT,
                    num_prototypes=k_max, longnet=longnet, cluster_temperature=0.1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (B, 16, 16, 3)).astype(np.uint8)
  ids = rng.integers(4, 100, (B, LT)).astype(np.int32)
  mask = np.ones((B, LT), bool)
  boxed = model.init(jax.random.key(0), images, ids, mask)["params"]
  assert_logically_annotated(boxed)
  params = randomize(nn.unbox(boxed))
  assert set(params["longnet"]) == {"score_embed", "cluster_embed", "block_0", "final_norm"}
  # The ITM head reads [image CLS, text CLS, LongNet pool].
  assert params["itm_head"]["kernel"].shape == (2 * E + 8, 2)
  out = model.apply({"params": params}, images, ids, mask)

  def itm(p, active):
    return model.apply({"params": p}, out["image_tokens"], out["text_tokens"], mask,
                       out["image_feats"], out["text_feats"], active,
                       method=ClusModel.itm_logits)

  active = np.arange(k_max) < 6
  base = itm(params, active)
  assert base.shape == (B, 2) and np.isfinite(base).all()
  # The cluster tokens are V_T = F_I Z / tau, V_I = F_T Z / tau of the active prototypes:
  # moving an active prototype changes the logits, moving an inactive one does not.
  z = np.asarray(params["prototypes"])
  for column, changes in ((2, True), (8, False)):
    moved = z.copy()
    moved[:, column] = -moved[:, column]
    got = itm({**params, "prototypes": moved}, active)
    assert (not np.allclose(got, base, atol=1e-6)) == changes, column
  with pytest.raises(ValueError, match="needs image_feats, text_feats and active"):
    model.apply({"params": params}, out["image_tokens"], out["text_tokens"], mask,
                method=ClusModel.itm_logits)


ITM_CONFIG = dict(vision=dict(patch_size=8, width=E, depth=1, num_heads=2, mlp_dim=32),
                  text=dict(width=E, depth=1, num_heads=2, mlp_dim=32), embed_dim=8,
                  dropout=0.0, temperature_init=0.05, fusion="co_attention", fusion_depth=1)


def _itm_models(key):
  """(the model without and with config key `key`, images, ids, mask)."""
  models = [ClusModel(ml_collections.FrozenConfigDict(dict(ITM_CONFIG, **{key: flag})),
                      vocab_size=128, max_text_len=LT, num_prototypes=10)
            for flag in (False, True)]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (B, 16, 16, 3)).astype(np.uint8)
  ids = rng.integers(4, 100, (B, LT)).astype(np.int32)
  return models, images, ids, np.ones((B, LT), bool)


def test_itm_itc_residual_adds_the_scaled_itc_cosine_to_the_match_logit():
  models, images, ids, mask = _itm_models("itm_itc_residual")
  params = nn.unbox(models[1].init(jax.random.key(0), images, ids, mask)["params"])
  assert params["itm_itc_scale"] == pytest.approx(1 / 0.05)   # 1 / the ITC temperature
  params = randomize(params)
  plain = {k: v for k, v in params.items() if k != "itm_itc_scale"}
  out = models[1].apply({"params": params}, images, ids, mask)
  # Every image with every text: the match logit moves by scale x cosine, no-match not at all.
  img_i, txt_i = np.repeat(np.arange(B), B), np.tile(np.arange(B), B)
  args = (out["image_tokens"][img_i], out["text_tokens"][txt_i], mask[txt_i],
          out["image_feats"][img_i], out["text_feats"][txt_i])
  base = models[0].apply({"params": plain}, *args, method=ClusModel.itm_logits)
  got = models[1].apply({"params": {**plain, "itm_itc_scale": jnp.float32(7.0)}}, *args,
                        method=ClusModel.itm_logits)
  cosine = np.sum(np.asarray(args[3]) * np.asarray(args[4]), axis=-1)
  np.testing.assert_allclose(got[:, 0], base[:, 0], atol=1e-5)
  np.testing.assert_allclose(got[:, 1], base[:, 1] + 7.0 * cosine, atol=1e-4)
  # No gradient reaches the features through the cosine.
  grad = jax.grad(lambda f: models[1].apply({"params": params}, *args[:3], f, args[4],
                                            method=ClusModel.itm_logits)[:, 1].sum())(args[3])
  np.testing.assert_allclose(grad, 0.0)
  with pytest.raises(ValueError, match="itm_itc_residual needs image_feats and text_feats"):
    models[1].apply({"params": params}, *args[:3], method=ClusModel.itm_logits)


def test_itm_head_product_reads_the_product_of_the_fused_cls():
  """model.itm_head_product: ITM's (linear) head reads [image CLS, text CLS, their
  product]; its kernel's last E rows weigh the product, and with them zero the
  logits are the plain head's."""
  models, images, ids, mask = _itm_models("itm_head_product")
  params = randomize(nn.unbox(models[1].init(jax.random.key(0), images, ids, mask)["params"]))
  kernel = np.asarray(params["itm_head"]["kernel"])
  assert kernel.shape == (3 * E, 2)
  out = models[1].apply({"params": params}, images, ids, mask)
  args = (out["image_tokens"], out["text_tokens"], mask)
  img, txt = models[1].apply({"params": params}, *args, outputs="cls",
                             method=lambda m, *a, **k: m.fusion(*a, **k))
  product = np.asarray(img[:, 0] * txt[:, 0])
  plain = {**params, "itm_head": {**params["itm_head"], "kernel": kernel[:2 * E]}}
  base = models[0].apply({"params": plain}, *args, method=ClusModel.itm_logits)
  got = models[1].apply({"params": params}, *args, method=ClusModel.itm_logits)
  np.testing.assert_allclose(got, np.asarray(base) + product @ kernel[2 * E:], atol=1e-4)
  assert np.abs(product @ kernel[2 * E:]).max() > 1e-3     # the product term is not nil
  wide = dict(ITM_CONFIG, itm_head_product=True, text=dict(ITM_CONFIG["text"], width=2 * E))
  with pytest.raises(ValueError, match="itm_head_product=True needs fused streams of one width"):
    ClusModel(ml_collections.FrozenConfigDict(wide), vocab_size=128, max_text_len=LT,
              num_prototypes=10).init(jax.random.key(0), images, ids, mask)
