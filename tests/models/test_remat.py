"""config.remat: the parameter tree is unchanged, and every allowed policy gives the
blocks' outputs and gradients of the block without remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core.primitives import remat_p

from clusjax.config import REMAT_POLICIES
from clusjax.models.clus import build_model
from clusjax.models.layers import TransformerBlock, remat_block
from clusjax.models.longnet import LongNetBlock
from clusjax.train.state import dummy_batch
from tests.conftest import micro_config


def _param_tree(config):
  """{path: (shape, dtype, logical names)} of the model's boxed params, from shapes alone."""
  model = build_model(config, config.data.vocab_size)
  b = dummy_batch(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), b["image"], b["text_ids"],
                                            b["text_mask"]))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  return {jax.tree_util.keystr(path): (leaf.value.shape, leaf.value.dtype, leaf.names)
          for path, leaf in leaves}


@pytest.mark.parametrize("fusion,longnet_enabled", [("co_attention", True),
                                                    ("self_attention", False)])
def test_remat_keeps_the_parameter_tree(tmp_path, fusion, longnet_enabled):
  """Export to PyTorch and checkpoint loading key on these names."""
  trees = {}
  for remat in ("none", "full", "dots_saveable"):
    config = micro_config(tmp_path, remat=remat, model__fusion=fusion,
                          longnet__enabled=longnet_enabled)
    trees[remat] = _param_tree(config)
  assert any("longnet" in p for p in trees["none"]) and any("block_0" in p for p in trees["none"])
  assert trees["full"] == trees["none"]
  assert trees["dots_saveable"] == trees["none"]


def _block_loss(block, x, mask, rng):
  def loss(params):
    y = block.apply(params, x, mask, False, rngs={"dropout": rng})
    return jnp.sum(y * jnp.cos(y))   # not linear in y, so the backward needs the activations
  return loss


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_every_policy_gives_the_gradients_without_remat(policy):
  """A ViT/BERT block and a LongNet block, with dropout (remat must replay its masks)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 8)) < 0.8).at[:, 0].set(True)
  blocks = (
      (TransformerBlock, dict(num_heads=2, mlp_dim=32, pre_norm=True, dropout=0.1)),
      (LongNetBlock, dict(num_heads=2, mlp_dim=32, segment_lengths=(4, 8),
                          dilation_rates=(1, 2), implementation="xla", dropout=0.1)))
  for cls, kw in blocks:
    plain = cls(**kw)
    params = jax.jit(plain.init)(jax.random.key(0), x, mask)
    checkpointed = remat_block(cls, policy, static_argnums=(3,))(**kw)
    loss = _block_loss(checkpointed, x, mask, jax.random.key(1))
    eqns = jax.make_jaxpr(loss)(params).jaxpr.eqns
    assert any(e.primitive is remat_p for e in eqns)   # really rematerialised
    ref = jax.jit(jax.value_and_grad(_block_loss(plain, x, mask, jax.random.key(1))))(params)
    got = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1],
                 ref[1])
