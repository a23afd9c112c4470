"""BertEncoder: shapes, annotations, masking, sharding, and equality with HF BertModel."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.export import bert_config_to_hf, bert_params_from_hf, bert_params_to_hf
from clusjax.models import BertEncoder
from tests.models.test_layers import (assert_logically_annotated, assert_sharded_matches,
                                      randomize)

CFG = dict(vocab_size=128, width=64, depth=2, num_heads=4, mlp_dim=128, max_len=16)
LENGTHS = (12, 7, 3, 12)   # real tokens per row; the rest is padding


def _batch(batch=2, length=12, seed=0):
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 1, CFG["vocab_size"],
                           dtype=jnp.int32)
  mask = np.arange(length)[None, :] < np.array(LENGTHS[:batch])[:, None]
  ids = jnp.where(mask, ids, 0)   # pad id 0, as a tokenizer would
  return ids, jnp.asarray(mask)


@pytest.fixture(scope="module")
def boxed():
  return BertEncoder(**CFG).init(jax.random.key(0), *_batch())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_shapes_and_dtypes(boxed, dtype):
  params = nn.unbox(boxed)
  out = BertEncoder(**CFG, dtype=dtype).apply(params, *_batch())
  assert out.shape == (2, 12, 64)
  assert out.dtype == dtype
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
  if dtype == jnp.bfloat16:
    ref = BertEncoder(**CFG).apply(params, *_batch())
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.15)


def test_every_param_logically_annotated(boxed):
  assert_logically_annotated(boxed)
  p = boxed["params"]
  assert set(p) == {"word_embeddings", "position_embeddings", "token_type_embeddings",
                    "embed_norm", "layer_0", "layer_1"}
  assert p["word_embeddings"]["embedding"].names == ("vocab", "embed")
  assert p["position_embeddings"]["embedding"].names == (None, "embed")
  assert p["layer_1"]["attn"]["out"]["kernel"].names == ("heads", "kv", "embed")
  assert p["layer_1"]["norm2"]["bias"].names == ("embed",)


def test_padding_is_masked(boxed):
  params = randomize(nn.unbox(boxed)["params"])
  model = BertEncoder(**CFG)
  ids, mask = _batch()
  out = model.apply({"params": params}, ids, mask)
  other = jnp.where(mask, ids, 77)   # different tokens at padded positions only
  got = model.apply({"params": params}, other, mask)
  np.testing.assert_allclose(np.where(mask[..., None], got, 0), np.where(mask[..., None], out, 0),
                             atol=1e-6)
  # Without the mask the same change does reach the real tokens.
  a = model.apply({"params": params}, ids, None)
  b = model.apply({"params": params}, other, None)
  assert not np.allclose(a[1, :7], b[1, :7], atol=1e-3)


def test_rejects_too_long_text(boxed):
  with pytest.raises(ValueError, match=r"length 20 exceeds max_len=16"):
    BertEncoder(**CFG).apply(nn.unbox(boxed), jnp.zeros((1, 20), jnp.int32),
                             jnp.ones((1, 20), bool))


def test_sharded_forward_matches_unsharded(boxed):
  assert_sharded_matches(BertEncoder(**CFG), boxed, *_batch(batch=4))


def _hf_model(transformers):
  config = transformers.BertConfig(**bert_config_to_hf(**CFG), attn_implementation="eager")
  return transformers.BertModel(config, add_pooling_layer=False).eval()


def _hf_forward(torch, hf, ids, mask):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(np.array(ids)).long(),
              attention_mask=torch.from_numpy(np.array(mask)).long()).last_hidden_state.numpy()


def test_to_hf_matches_bert_model(boxed):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  params = randomize(nn.unbox(boxed)["params"])
  ids, mask = _batch(seed=5)
  ours = np.asarray(BertEncoder(**CFG).apply({"params": params}, ids, mask))

  hf = _hf_model(transformers)
  state_dict = bert_params_to_hf(params, num_heads=CFG["num_heads"])
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
  # All positions, padded ones included: both attend from them to real keys only.
  np.testing.assert_allclose(ours, _hf_forward(torch, hf, ids, mask), atol=1e-5, rtol=0)


def test_from_hf_matches_and_round_trips():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = _hf_model(transformers)
  # HF init leaves biases at 0 and LayerNorms at 1/0: perturb every tensor.
  with torch.no_grad():
    for t in hf.state_dict().values():
      t.add_(0.1 * torch.randn_like(t))
  state_dict = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
  ids, mask = _batch(batch=4, seed=6)

  params = bert_params_from_hf(hf.state_dict(), num_heads=CFG["num_heads"])
  ours = np.asarray(BertEncoder(**CFG).apply({"params": params}, ids, mask))
  np.testing.assert_allclose(ours, _hf_forward(torch, hf, ids, mask), atol=1e-5, rtol=0)

  again = bert_params_to_hf(params, num_heads=CFG["num_heads"])
  assert again.keys() == state_dict.keys()
  for key, value in state_dict.items():
    np.testing.assert_array_equal(again[key], value, err_msg=key)

  with pytest.raises(ValueError, match="num_heads=8"):
    bert_params_to_hf(params, num_heads=8)
  with pytest.raises(KeyError, match="missing"):
    bert_params_from_hf({k: v for k, v in state_dict.items() if "layer.1.output" not in k},
                        num_heads=CFG["num_heads"])
