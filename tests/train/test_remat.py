"""config.remat in the train step: the same loss and gradients, and less temporary memory."""
import jax
import numpy as np
import pytest
from jax.extend.core.primitives import remat_p

from clusjax.train.aot import compile_step
from tests.conftest import micro_config
from tests.train.test_mixed_precision import all_eqns, init_params, loss_fn


def test_remat_gives_the_loss_and_gradients_without_remat(tmp_path):
  """The whole objective (all terms, LongNet on), with dropout so that the recomputed
  forward must draw the same masks."""
  configs = {r: micro_config(tmp_path, remat=r, model__dropout=0.1)
             for r in ("none", "full", "dots_saveable")}
  params = init_params(configs["none"])
  (ref_loss, ref_terms), ref_grads = jax.jit(
      jax.value_and_grad(loss_fn(configs["none"]), has_aux=True))(params)
  for remat in ("full", "dots_saveable"):
    fn = loss_fn(configs[remat])
    assert any(e.primitive is remat_p for e in all_eqns(jax.make_jaxpr(fn)(params).jaxpr))
    (loss, terms), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for key in ref_terms:
      np.testing.assert_allclose(terms[key], ref_terms[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{remat}: {key}")
    # float32 recomputation reorders sums: its error scales with the tensor's largest
    # entry (ViT cls_token gradients reach ~60), so atol does too.
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())),
            err_msg=f"{remat}: {jax.tree_util.keystr(path)}"),
        grads, ref_grads)


@pytest.mark.slow
def test_remat_full_lowers_the_steps_temporary_memory_on_tpu(tmp_path, monkeypatch):
  """Compiled for one compile-only TPU v5e chip (libtpu; about 2-3 minutes on 2 cores).

  Not on the CPU backend: XLA:CPU removes the optimisation barriers remat leaves
  (there are none in its compiled HLO) and its temporaries come out larger with
  remat, not smaller (benchmarks/RESULTS.md, "Train step"). Measured here for
  this config: 50.7 MiB of temporaries without remat, 23.5 MiB with "full".
  """
  pytest.importorskip("libtpu")
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  chip = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[:1]
  # ITC only (a small program), 65-token images through 4 blocks, batch 128: activations
  # large enough to show in HBM temporaries (with batch 8 they report 0 bytes).
  overrides = dict(mesh__data=1, model__vision__patch_size=4, model__vision__depth=4,
                   model__text__depth=1, train__batch_size=128, clustering__queue_size=256,
                   longnet__depth=0, loss__itm_weight=0.0, loss__mlm_weight=0.0,
                   loss__swap_weight=0.0, loss__prompt_weight=0.0, loss__noun_code_weight=0.0,
                   loss__noun_code_text_weight=0.0)
  for tower in ("vision", "text"):
    overrides.update({f"model__{tower}__width": 64, f"model__{tower}__mlp_dim": 256})
  # The persistent cache cannot load executables of compile-only devices: keep them out.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    temp = {r: compile_step(micro_config(tmp_path, remat=r, **overrides), chip).temp_bytes
            for r in ("none", "full")}
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  assert temp["full"] < 0.7 * temp["none"], temp
