"""LongNet over cluster tokens (DESIGN §4): embedding and pooling against numpy,
masking of inactive clusters, the dense ablation, and the two kernel paths."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clusjax.models import LongNet
from tests.models.test_layers import assert_logically_annotated, randomize

B, K, E = 2, 12, 16
INACTIVE = [1, 4, 5, 11]


def _model(**overrides):
  kw = dict(width=E, depth=1, num_heads=2, mlp_dim=32, max_clusters=16,
            segment_lengths=(4, 8), dilation_rates=(1, 2), implementation="xla")
  kw.update(overrides)
  return LongNet(**kw)


def _inputs(k=K, seed=0, inactive=INACTIVE):
  rng = np.random.default_rng(seed)
  v_t = (3 * rng.normal(size=(B, k))).astype(np.float32)
  v_i = (3 * rng.normal(size=(B, k))).astype(np.float32)
  active = np.ones((k,), bool)
  active[inactive] = False
  return v_t, v_i, active


# Jitted init / apply: one compile of the whole module rather than eager
# op-by-op dispatch (about 2x faster for init here).
def _init(model, *args, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), *args)


def _apply(model, params, *args):
  return np.asarray(jax.jit(model.apply)({"params": params}, *args))


def _params(model, *args, seed=0):
  """Randomised (unboxed) params, so LayerNorm scales/biases are non-trivial."""
  return randomize(nn.unbox(_init(model, *args, seed=seed))["params"], seed=seed)


def test_output_shape_params_and_gradients():
  model = _model()
  v_t, v_i, active = _inputs()
  boxed = _init(model, v_t, v_i, active)
  assert_logically_annotated(boxed["params"])
  params = randomize(nn.unbox(boxed)["params"])
  assert set(params) == {"score_embed", "cluster_embed", "block_0", "final_norm"}
  assert set(params["block_0"]) == {"norm1", "attn", "norm2", "mlp"}
  assert set(params["block_0"]["attn"]) == {"query", "key", "value", "out"}
  assert params["cluster_embed"]["embedding"].shape == (16, E)

  def loss(p, vt, vi):
    out = model.apply({"params": p}, vt, vi, active)
    return jnp.sum(jnp.sin(3 * out)), out   # not a plain sum: LN makes that ~constant

  (_, out), (g_params, g_vt, g_vi) = jax.jit(
      jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, v_t, v_i)
  assert out.shape == (B, E) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  for path, g in jax.tree_util.tree_leaves_with_path(g_params):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)
  for g in (np.asarray(g_vt), np.asarray(g_vi)):
    assert np.all(np.isfinite(g))
    assert np.all(np.any(g[:, active] != 0, axis=0))   # every active column matters
    np.testing.assert_array_equal(g[:, ~active], 0.0)  # no inactive one does


def test_depth_zero_is_the_masked_mean_of_the_embedded_tokens():
  """Eq. 8 embedding + final LayerNorm + masked mean, against numpy."""
  model = _model(depth=0)
  v_t, v_i, active = _inputs()
  p = _params(model, v_t, v_i, active)
  out = _apply(model, p, v_t, v_i, active)
  se, ce, fn = (jax.tree.map(np.asarray, p[n]) for n in ("score_embed", "cluster_embed",
                                                           "final_norm"))
  x = np.stack([v_t, v_i], -1) @ se["kernel"] + se["bias"] + ce["embedding"][:K]
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12)
  x = x * fn["scale"] + fn["bias"]
  np.testing.assert_allclose(out, x[:, active].mean(1), atol=1e-5)


def test_inactive_clusters_do_not_change_the_output():
  model = _model()
  v_t, v_i, active = _inputs()
  p = _params(model, v_t, v_i, active)
  apply = jax.jit(model.apply)
  out = np.asarray(apply({"params": p}, v_t, v_i, active))
  v_t2, v_i2 = v_t.copy(), v_i.copy()
  v_t2[:, INACTIVE] = [1e4, -7.0, np.inf, np.nan]
  v_i2[:, INACTIVE] = [np.nan, 3.0, -1e4, -np.inf]
  np.testing.assert_array_equal(np.asarray(apply({"params": p}, v_t2, v_i2, active)), out)
  # ...while an active column does change it.
  v_t2[:, 0] += 1.0
  assert not np.allclose(np.asarray(apply({"params": p}, v_t2, v_i2, active)), out)
  # No active cluster: pooled output 0.
  none = apply({"params": p}, v_t, v_i, np.zeros((K,), bool))
  np.testing.assert_array_equal(np.asarray(none), 0.0)


def test_dense_ablation_has_the_same_params_and_equals_undilated_attention():
  v_t, v_i, active = _inputs()
  # One segment per branch (w >= K) and no dilation: every branch is full
  # attention, equal lse's mix them half and half, i.e. dense attention.
  kw = dict(segment_lengths=(16, 4096), dilation_rates=(1, 1))
  dilated, dense = _model(**kw), _model(dense=True, **kw)
  shapes = [jax.eval_shape(m.copy(depth=2).init, jax.random.key(0), v_t, v_i, active)["params"]
            for m in (dilated, dense)]
  leaves = [jax.tree_util.tree_leaves_with_path(
      s, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)) for s in shapes]
  assert [(path, leaf.value.shape, leaf.names) for path, leaf in leaves[0]] == \
         [(path, leaf.value.shape, leaf.names) for path, leaf in leaves[1]]

  p = _params(dense, v_t, v_i, active)
  want = _apply(dense, p, v_t, v_i, active)
  np.testing.assert_allclose(_apply(dilated, p, v_t, v_i, active), want, atol=1e-5)
  # With dilation the attention pattern, hence the output, differs.
  sparse = _model(segment_lengths=(4, 8), dilation_rates=(1, 2))
  assert not np.allclose(_apply(sparse, p, v_t, v_i, active), want, atol=1e-3)


def test_xla_and_pallas_give_the_same_output():
  k = 64
  v_t, v_i, active = _inputs(k=k, inactive=[0, 5, 17, 18, 40, 63])
  kw = dict(depth=1, max_clusters=k, segment_lengths=(16, 32), dilation_rates=(1, 2))
  p = _params(_model(**kw), v_t, v_i, active)
  # "pallas" runs the kernel with interpret=True on CPU.
  outs = [_apply(_model(implementation=impl, **kw), p, v_t, v_i, active)
          for impl in ("xla", "pallas")]
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-5, rtol=0)


def test_segments_longer_than_the_sequence_are_clipped():
  k = 11
  v_t, v_i, active = _inputs(k=k, inactive=[3, 10])
  long = _model(segment_lengths=(4096, 4096), dilation_rates=(1, 2))
  p = _params(long, v_t, v_i, active)
  short = _model(segment_lengths=(11, 12), dilation_rates=(1, 2))
  np.testing.assert_allclose(_apply(long, p, v_t, v_i, active),
                             _apply(short, p, v_t, v_i, active), atol=1e-6, rtol=0)


@pytest.mark.parametrize("overrides, shapes, message", [
    (dict(segment_lengths=(), dilation_rates=()), None, "segment_lengths=()"),
    (dict(segment_lengths=(4, 8), dilation_rates=(1,)), None, "dilation_rates=(1,)"),
    (dict(segment_lengths=(4, 6), dilation_rates=(1, 4)), None, "r=4 does not divide .* w=6"),
    (dict(segment_lengths=(0,), dilation_rates=(1,)), None, "w=0"),
    (dict(width=18, num_heads=4), None, "width=18 is not divisible by num_heads=4"),
    (dict(implementation="cuda"), None, "implementation='cuda'"),
    ({}, ((B, K), (B, K + 1), (K,)), r"v_i.shape=(2, 13)"),
    ({}, ((B, K), (B, K), (K - 1,)), r"active.shape=(11,)"),
    ({}, ((K,), (K,), (K,)), r"v_t.shape=(12,)"),
    (dict(max_clusters=8), None, "K=12 .* max_clusters=8"),
])
def test_bad_settings_raise(overrides, shapes, message):
  v_t, v_i, active = _inputs()
  if shapes is not None:
    v_t, v_i, active = (np.zeros(s, np.float32) for s in shapes)
  model = _model(**overrides)
  with pytest.raises(ValueError, match=re.escape(message) if "*" not in message else message):
    jax.eval_shape(model.init, jax.random.key(0), v_t, v_i, active)
