"""Which hard negative captions the objective reads: ITM only (loss.itc_caption_negatives
False) and only the batch's first rows' (loss.caption_negative_share)."""
import jax
import jax.numpy as jnp
import numpy as np

from clusjax.models.clus import build_model
from clusjax.train.objective import TextIds, compute_losses
from tests.conftest import micro_config
from tests.train.test_mixed_precision import init_params, random_batch, vocab


def _objective(config):
  """batch -> {term: value} of the config's objective at init (one compile per config)."""
  model = build_model(config, config.data.vocab_size)
  active = jnp.arange(config.clustering.max_prototypes) < config.clustering.num_prototypes
  params = init_params(config)
  terms = jax.jit(lambda b: compute_losses(model, params, b, jax.random.key(1), config,
                                           TextIds.of(vocab(config)), active)[1][0])
  return lambda batch: {k: float(v) for k, v in terms(batch).items()}


def _invalid(batch, rows):
  """`batch` with the hard negatives of `rows` marked invalid (masked out of the losses)."""
  return {**batch, "neg_valid": batch["neg_valid"].at[rows].set(False)}


def test_itm_only_negatives_of_the_first_rows(shapes_data_dir):
  # ITC and ITM alone keep the compiles small.
  config = micro_config(shapes_data_dir, data__scene_negatives=True,
                        loss__itm_caption_negatives=True, loss__itc_caption_negatives=False,
                        loss__caption_negative_share=0.5, loss__mlm_weight=0.0,
                        loss__swap_prediction=False, loss__noun_code_weight=0.0,
                        loss__noun_code_text_weight=0.0, loss__prompt_weight=0.0)
  batch = random_batch(config)
  rng = np.random.default_rng(0)
  batch["neg_text_ids"] = jnp.asarray(rng.integers(4, 128, batch["neg_text_ids"].shape))
  itm_only = _objective(config)
  base = itm_only(batch)
  # ITM reads the first half's negatives (8 of 16 rows), not the rest.
  np.testing.assert_allclose(itm_only(_invalid(batch, slice(8, None)))["itm"], base["itm"],
                             rtol=1e-6)
  changed = itm_only(_invalid(batch, slice(0, 8)))["itm"]
  assert abs(changed - base["itm"]) > 1e-4   # 100x the tolerance above
  # ITC without them: the same as a run that has none.
  plain = config.copy_and_resolve_references()
  plain.data.scene_negatives = False
  no_negatives = {k: v for k, v in batch.items() if not k.startswith("neg_")}
  np.testing.assert_allclose(base["itc"], _objective(plain)(no_negatives)["itc"], rtol=1e-6)
  # With loss.itc_caption_negatives, ITC reads them too.
  config.loss.itc_caption_negatives = True
  with_itc = _objective(config)(batch)
  assert abs(with_itc["itc"] - base["itc"]) > 1e-4
  np.testing.assert_allclose(with_itc["itm"], base["itm"], rtol=1e-6)
