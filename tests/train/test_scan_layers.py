"""config.scan_layers: each layer stack as one lax.scan, with the loop's params, loss and
gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import micro_config
from tests.train.test_mixed_precision import _train_step, all_eqns, init_params, loss_fn

DEEP = dict(model__vision__depth=3, model__text__depth=3, model__fusion_depth=3)


# Cold XLA:CPU compiles of the unrolled and scanned 3-layer stacks, forward and
# backward, take 3.5-7 min each on the 2-core machine: CI runs the default fusion
# (co_attention); `pytest -m slow` the rest.
@pytest.mark.parametrize("fusion", ["co_attention",
                                    pytest.param("self_attention", marks=pytest.mark.slow)])
def test_scan_layers_gives_the_params_loss_and_gradients_of_the_loop(tmp_path, fusion):
  loop = micro_config(tmp_path, model__fusion=fusion, **DEEP)
  scan = micro_config(tmp_path, model__fusion=fusion, scan_layers=True, **DEEP)
  params = init_params(loop)
  # The same parameter tree and values: checkpoints and export do not see the switch.
  jax.tree.map(np.testing.assert_array_equal, init_params(scan), params)

  fn = loss_fn(scan)
  # ViT, text (called for ITC and MLM) and fusion stacks are scans; the jaxpr shrinks.
  jaxpr = jax.make_jaxpr(fn)(params)
  scans = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == "scan"]
  assert len(scans) >= 4, len(scans)
  assert {e.params["length"] for e in scans} >= {3}
  assert len(str(jaxpr)) < 0.95 * len(str(jax.make_jaxpr(loss_fn(loop))(params)))

  (ref_loss, ref_terms), ref_grads = jax.jit(
      jax.value_and_grad(loss_fn(loop), has_aux=True))(params)
  (loss, terms), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for key in ref_terms:
    np.testing.assert_allclose(terms[key], ref_terms[key], rtol=1e-5, atol=1e-6, err_msg=key)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads))
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(
          a, b, rtol=0, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)),
      grads, ref_grads)


@pytest.mark.slow
def test_scan_layers_steps_with_remat_dropout_and_bfloat16(tmp_path):
  """The scan body under jax.checkpoint, per-layer dropout keys, a bf16 carry."""
  config = micro_config(tmp_path, scan_layers=True, remat="full", dtype="bfloat16",
                        model__dropout=0.1, **DEEP)
  _, _, metrics = _train_step(config)
  assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]), metrics
  grads = jax.jit(jax.grad(lambda p: loss_fn(config)(p)[0]))(init_params(config))
  # Every layer of every stack gets a finite, non-zero gradient from its scan slice.
  for tower, prefix in (("vision", "block_"), ("text", "layer_"), ("fusion", "text_block_")):
    for i in range(3):
      leaves = jax.tree.leaves(grads[tower][f"{prefix}{i}"])
      assert all(np.all(np.isfinite(g)) for g in leaves), (tower, i)
      assert all(np.any(g != 0) for g in leaves), (tower, i)
