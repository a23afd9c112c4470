"""The train step on 1 vs 8 devices, and exact resume from a checkpoint."""
import json
import shutil

import jax
import numpy as np
import pytest

from clusjax import workdir as wd
from clusjax.config import PARAM_GROUPS, ConfigError, caption_negative_groups, validate
from clusjax.data import Tokenizer, make_source, make_train_iterator
from clusjax.data.prompts import caption_tags, labeler_from_config
from clusjax.losses import infonce_from_logits, itc_logits, noun_codes, prompt_label_loss
from clusjax.models.clus import ClusModel, build_model
from clusjax.parallel.mesh import batch_sharding, create_mesh, mesh_context, rules_from_config
from clusjax.train.loop import compile_train_step, compiled_flops, train
from clusjax.train.optimizer import make_optimizer
from clusjax.train.objective import TextIds, contrastive_loss
from clusjax.train.step import make_loss_and_grads
from clusjax.train.state import abstract_state, dummy_batch, init_state
from tests.conftest import micro_config


TERMS = ("loss", "itc", "itm", "mlm", "swap", "prompt", "noun_code", "noun_code_text")


def _one_step(config, tokenizer, batch, mesh):
  rules = rules_from_config(config)
  model = build_model(config, tokenizer.vocab_size)
  tx, schedule = make_optimizer(config.optim, config.train.num_steps)
  shapes, shardings = abstract_state(model, tx, config, mesh, rules)
  state = init_state(model, tx, config, shardings)
  step = compile_train_step(model, tx, schedule, config, tokenizer, mesh, rules, shapes,
                            shardings)
  sharding = batch_sharding(mesh, rules)
  global_batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  # Two steps so that the second loss sees the first update.
  state, m1 = step(state, global_batch)
  state, m2 = step(state, global_batch)
  return state, jax.device_get(m1), jax.device_get(m2)


@pytest.fixture(scope="module")
def data(shapes_data_dir, tmp_path_factory):
  # With hard negative captions, so that their encoding is checked on 8 devices too.
  # ITM sees them too (loss.itm_caption_negatives): its 4B pairs on 8 devices.
  config = micro_config(shapes_data_dir,
                        data__caption_negatives=("circle square triangle diamond cross",),
                        loss__itm_caption_negatives=True)
  source = make_source(config.data, "train")
  captions = [source[i]["caption"] for i in range(len(source))]
  tokenizer = Tokenizer.train(captions, str(tmp_path_factory.mktemp("tok") / "t.model"),
                              config.data.vocab_size)
  it = make_train_iterator(source, global_batch_size=config.train.batch_size, seed=0,
                           image_size=config.data.image_size, tokenizer=tokenizer,
                           max_text_len=config.data.max_text_len,
                           negative_groups=caption_negative_groups(config.data.caption_negatives),
                           prompt_labeler=labeler_from_config(config))
  batch = next(it)
  assert "neg_text_ids" in batch and "label_ids" in batch
  return config, tokenizer, batch


def test_step_on_8_devices_equals_1_device(data):
  config, tokenizer, batch = data
  # Only the first 6 of 16 rows' negatives (loss.caption_negative_share): 6 rows that the
  # batch's 4 shards do not divide.
  config = config.copy_and_resolve_references()
  config.loss.caption_negative_share = 0.375
  one = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  eight = create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state1, a1, b1 = _one_step(config, tokenizer, batch, one)
  state8, a8, b8 = _one_step(config, tokenizer, batch, eight)
  # Every term of the Clus objective, hard-negative sampling and masking included.
  for key in TERMS:
    np.testing.assert_allclose(a8[key], a1[key], rtol=1e-5)
  # A global norm over ~100 arrays, summed in another order across shards.
  np.testing.assert_allclose(a8["grad_norm"], a1["grad_norm"], rtol=1e-4)
  for key in TERMS:
    np.testing.assert_allclose(b8[key], b1[key], rtol=1e-5)
  assert b1["loss"] != a1["loss"]
  flat1 = jax.tree.leaves(jax.device_get(state1.params))
  flat8 = jax.tree.leaves(jax.device_get(state8.params))
  # Adam's first steps move each weight by ~lr * sign(grad), so a weight whose
  # gradient is ~0 may move differently under another summation order; the
  # updated params must still agree on average (and the second loss above
  # already shows the update was the same).
  diffs = np.concatenate([np.abs(p8 - p1).ravel() for p1, p8 in zip(flat1, flat8)])
  assert diffs.mean() < 1e-6, diffs.mean()
  # The big matrices are really split on 8 devices.
  kernels = [x for x in jax.tree.leaves(state8.params) if x.ndim >= 2 and x.size >= 32 * 64]
  assert any(k.addressable_shards[0].data.size < k.size for k in kernels)


def _init_params(config, tokenizer, mesh):
  """(model, its initial params on the host)."""
  model = build_model(config, tokenizer.vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  _, shardings = abstract_state(model, tx, config, mesh, rules_from_config(config))
  return model, jax.device_get(init_state(model, tx, config, shardings).params)


@pytest.mark.parametrize("kind", ["siglip", "softclip", "softclip_tags", "label_smooth"])
def test_itc_kind_is_the_term_the_step_trains(data, kind):
  """loss.itc.kind swaps the contrastive term: the step's `itc` is that loss of the
  towers' outputs (ITC only, so the step is small), and SigLIP's scalars learn."""
  config, tokenizer, batch = data
  config = config.copy_and_resolve_references()
  config.data.caption_negatives = ()
  config.loss.itc.kind = kind.replace("_tags", "")
  if kind == "softclip_tags":   # the self-similarity of each caption's objects
    config.loss.itc.softclip.self_similarity = "tags"
    tags = [caption_tags(tokenizer.decode(ids[mask])[0]) for ids, mask in
            zip(batch["text_ids"], batch["text_mask"])]
    assert all(tags) and len(set(tags)) > 1
    batch = dict(batch, **dict(zip(("tag_ids", "tag_mask"),
                                   tokenizer.encode(tags, config.data.max_text_len))))
  for key in ("itm_weight", "mlm_weight", "swap_weight", "prompt_weight", "noun_code_weight",
              "noun_code_text_weight"):
    config.loss[key] = 0.0
  config.loss.unimodal.update(image_weight=0.0, text_weight=0.0)
  validate(config)
  batch = {k: batch[k] for k in dummy_batch(config, 1)}   # the fields an ITC-only step takes
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model, before = _init_params(config, tokenizer, mesh)
  out = model.apply({"params": before}, batch["image"], batch["text_ids"], batch["text_mask"])
  if kind == "softclip_tags":
    out["tag_feats"] = model.apply({"params": before}, batch["tag_ids"], batch["tag_mask"],
                                   method=ClusModel.encode_text)[1]
  expected = contrastive_loss(config.loss, out, itc_logits(out["image_feats"], out["text_feats"],
                                                           out["temperature"]))
  state, m1, _ = _one_step(config, tokenizer, batch, mesh)
  np.testing.assert_allclose(m1["itc"], expected, rtol=1e-5)
  assert m1["loss"] == pytest.approx(float(m1["itc"]), rel=1e-6)
  if kind == "siglip":
    assert before["siglip_log_temperature"] == pytest.approx(np.log(10.0))
    assert before["siglip_bias"] == -10.0
    assert state.params["siglip_bias"] != before["siglip_bias"]
  else:
    assert "siglip_bias" not in before


def _metrics(workdir):
  with open(wd.path(workdir, wd.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_resume_from_checkpoint_is_exact(shapes_data_dir, tmp_path):
  # Clustering every 2 steps: its prototype updates must resume exactly too; and ITM
  # stops drawing place twins after step 3 of 6 (a switch on the step in the step).
  config = micro_config(shapes_data_dir, clustering__cluster_every=2,
                        loss__itm_twin_negatives=0.5)
  full = tmp_path / "full"
  _, state_full, _ = train(config, str(full))
  assert int(state_full.step) == config.train.num_steps
  steps = sorted(int(p.name) for p in (full / wd.CHECKPOINT_DIR).iterdir() if p.name.isdigit())
  assert steps == [3, 6]

  # A run that died after its step-3 checkpoint: same workdir minus what came later.
  resumed = tmp_path / "resumed"
  shutil.copytree(full, resumed)
  shutil.rmtree(resumed / wd.CHECKPOINT_DIR / "6")
  (resumed / wd.METRICS_FILE).unlink()
  _, state_resumed, _ = train(config, str(resumed))

  # Every logged step has its throughput, FLOPs from the compiled step.
  logged = [m for m in _metrics(full) if "loss" in m]
  assert all(m["tflops_per_device"] > 0 and m["examples_per_sec"] > 0 for m in logged)
  full_losses = {m["step"]: m["loss"] for m in _metrics(full) if "loss" in m}
  resumed_losses = {m["step"]: m["loss"] for m in _metrics(resumed) if "loss" in m}
  assert sorted(resumed_losses) == [4, 5, 6]
  for step in (4, 5, 6):
    np.testing.assert_allclose(resumed_losses[step], full_losses[step], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(state_full.params)),
                  jax.tree.leaves(jax.device_get(state_resumed.params))):
    np.testing.assert_array_equal(a, b)


def test_clustering_sets_k_and_grows_k_max(shapes_data_dir, tmp_path):
  """DBSCAN between steps: k is logged, plots are written, and when k outgrows
  K_max the prototypes double (recompiled) and later steps, the checkpoint
  and load_pretrained all carry the new K_max."""
  import clusjax
  from clusjax.train.checkpoint import Checkpointer
  config = micro_config(shapes_data_dir, clustering__cluster_every=3,
                        clustering__num_prototypes=1, clustering__max_prototypes=1,
                        clustering__min_samples=2)
  workdir = tmp_path / "run"
  _, state, _ = train(config, str(workdir))
  logs = [m for m in _metrics(workdir) if "clustering/num_clusters" in m]
  assert [m["step"] for m in logs] == [3, 6]
  for m in logs:
    assert m["clustering/eps"] > 0 and 0 <= m["clustering/noise_fraction"] < 1
  k = logs[0]["clustering/num_clusters"]
  assert k >= 2, logs                      # more than the one column it started with
  k_max = int(state.active.shape[0])
  assert k_max >= max(m["clustering/num_clusters"] for m in logs) and k_max & (k_max - 1) == 0
  assert int(state.active.sum()) == logs[-1]["clustering/num_clusters"]
  # LongNet's cluster-index embedding has a row per prototype column: it grew too.
  assert state.params["longnet"]["cluster_embed"]["embedding"].shape[0] == k_max
  z = np.asarray(state.params["prototypes"])
  np.testing.assert_allclose(np.linalg.norm(z, axis=0), 1.0, rtol=1e-5)
  assert sorted(p.name for p in (workdir / "clusters").iterdir()) == [
      "kdistance_3.png", "kdistance_6.png", "sizes_3.png", "sizes_6.png"]
  ckpt = Checkpointer(str(workdir / wd.CHECKPOINT_DIR), read_only=True)
  assert ckpt.k_max(3) <= ckpt.k_max(6) == k_max
  ckpt.close()
  model = clusjax.load_pretrained(str(workdir))
  np.testing.assert_array_equal(model.params["prototypes"], z)


def test_unimodal_terms_join_the_objective(data):
  """Uni-modal contrast: with an identity image view, uni_image is the InfoNCE of
  the image features with themselves; uni_text contrasts masked captions; the
  ITC term is the one the step computes without them."""
  config, tokenizer, batch = data
  config = config.copy_and_resolve_references()
  config.data.caption_negatives = ()
  for key in ("itm_weight", "mlm_weight", "swap_weight", "prompt_weight", "noun_code_weight",
              "noun_code_text_weight"):
    config.loss[key] = 0.0
  config.loss.unimodal.update(image_weight=0.5, text_weight=0.25, max_shift=0, brightness=0.0,
                              noise_std=0.0)
  validate(config)
  batch = {k: batch[k] for k in dummy_batch(config, 1)}
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model, params = _init_params(config, tokenizer, mesh)
  out = model.apply({"params": params}, batch["image"], batch["text_ids"], batch["text_mask"])
  t = out["temperature"]
  itc = infonce_from_logits(itc_logits(out["image_feats"], out["text_feats"], t))
  identity_image = infonce_from_logits(itc_logits(out["image_feats"], out["image_feats"], t))
  identity_text = infonce_from_logits(itc_logits(out["text_feats"], out["text_feats"], t))
  _, m1, _ = _one_step(config, tokenizer, batch, mesh)
  np.testing.assert_allclose(m1["itc"], itc, rtol=1e-5)
  np.testing.assert_allclose(m1["uni_image"], identity_image, rtol=1e-5)
  # From scratch all caption features are alike, so masking moves this little.
  assert m1["uni_text"] == pytest.approx(float(identity_text), rel=1e-3)
  np.testing.assert_allclose(m1["loss"], m1["itc"] + 0.5 * m1["uni_image"] + 0.25 * m1["uni_text"],
                             rtol=1e-6)


def test_throughput_reports_tflops_and_mfu_against_the_chip_peak():
  from clusjax.train.loop import throughput
  out = throughput(2e12, steps=10, seconds=4.0, batch_size=64, device_kind="TPU v5 lite",
                   dtype="bfloat16")
  assert out["examples_per_sec"] == 160.0 and out["tflops_per_device"] == 5.0
  assert out["mfu"] == pytest.approx(5e12 / 197e12)
  h100 = throughput(2e12, 10, 4.0, 64, "NVIDIA H100 80GB HBM3", "float32")
  assert h100["mfu"] == pytest.approx(5e12 / 67e12)
  assert "mfu" not in throughput(2e12, 10, 4.0, 64, "cpu", "float32")   # no peak in the table


def _loss_and_grads(config, tokenizer, batch, mesh, accum):
  config = config.copy_and_resolve_references()
  config.grad_accum_steps = accum
  config.mesh.update(dict(mesh.shape))
  validate(config, mesh.size)
  rules = rules_from_config(config)
  model = build_model(config, tokenizer.vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  _, shardings = abstract_state(model, tx, config, mesh, rules)
  state = init_state(model, tx, config, shardings)
  sharding = batch_sharding(mesh, rules)
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  fn = jax.jit(make_loss_and_grads(model, config, TextIds.of(tokenizer)))
  with mesh_context(mesh, rules):
    loss, (terms, out), grads = fn(state.params, batch, jax.random.key(0), state.active)
  return jax.device_get((loss, terms, out, grads))


@pytest.mark.parametrize("devices", [1, 8])
def test_grad_accumulation_keeps_the_batch_terms_whole(data, devices):
  """4 microbatches give the whole batch's ITC (with its hard negative captions)
  + swap prediction (+ noun code) loss and gradients: their features see every
  negative and Sinkhorn the whole batch. ITM, MLM and the uni-modal views (per
  microbatch) are off, and there is no dropout."""
  config, tokenizer, batch = data
  config = config.copy_and_resolve_references()
  config.loss.itm_weight = config.loss.mlm_weight = config.loss.prompt_weight = 0.0
  config.loss.unimodal.update(image_weight=0.0, text_weight=0.0)
  config.loss.noun_code_text_weight = 0.5
  batch = {k: batch[k] for k in dummy_batch(config, 1)}
  mesh = (create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]) if devices == 1
          else create_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  loss1, terms1, out1, grads1 = _loss_and_grads(config, tokenizer, batch, mesh, 1)
  loss4, terms4, out4, grads4 = _loss_and_grads(config, tokenizer, batch, mesh, 4)
  for key in ("itc", "swap", "noun_code", "noun_code_text", "negative_similarity"):
    np.testing.assert_allclose(terms4[key], terms1[key], rtol=1e-5)
  # The text term: the captions' features against their nouns' codes.
  label_noun = batch["label_noun"].reshape(-1)
  for term, feats in (("noun_code", "image_feats"), ("noun_code_text", "text_feats")):
    np.testing.assert_allclose(terms1[term], prompt_label_loss(
        out1[feats], noun_codes(label_noun, out1[feats].shape[-1]), label_noun,
        batch["caption_nouns"], out1["temperature"]), rtol=1e-5)
  assert abs(terms1["noun_code_text"] - terms1["noun_code"]) > 1e-3
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  np.testing.assert_allclose(out4["image_feats"], out1["image_feats"], atol=1e-6)
  flat1, flat4 = jax.tree.leaves(grads1), jax.tree.leaves(grads4)
  scale = max(np.abs(g).max() for g in flat1)
  assert scale > 0
  for g1, g4 in zip(flat1, flat4):
    np.testing.assert_allclose(g4, g1, rtol=1e-4, atol=1e-4 * scale)


def test_grad_accumulation_trains_the_full_objective(data):
  """All terms with 4 microbatches on 8 devices: ITM and MLM per microbatch."""
  config, tokenizer, batch = data
  config = config.copy_and_resolve_references()
  config.data.caption_negatives = ()
  config.grad_accum_steps = 4
  batch = {k: batch[k] for k in dummy_batch(config, 1)}
  _, m1, m2 = _one_step(config, tokenizer, batch, create_mesh({"data": 2, "fsdp": 2,
                                                                "tensor": 2}))
  for key in TERMS:
    assert np.isfinite(m1[key]) and np.isfinite(m2[key])
  assert m2["loss"] != m1["loss"]
  config.grad_accum_steps = 3
  with pytest.raises(ConfigError, match="not divisible by config.grad_accum_steps=3"):
    validate(config)
  config.grad_accum_steps, config.loss.itc.kind = 2, "softclip"
  config.loss.itc.softclip.self_similarity = "tags"
  with pytest.raises(ConfigError, match="grad_accum_steps=2 does not work with "
                                        "config.loss.itc.softclip.self_similarity='tags'"):
    validate(config)


def _leaves_changed(before, after):
  return [not np.array_equal(np.asarray(a), np.asarray(b))
          for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]


def test_frozen_paths_get_no_gradient_update_or_moments(data):
  """optim.frozen=("vision",): the image tower's parameters stay bit for bit over two
  steps while the rest train, Adam keeps no moments for them, and the step's
  backward pass through the tower is not built (fewer compiled FLOPs). A module
  path ("vision/block_0") freezes that module alone."""
  config, tokenizer, batch = data
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  frozen = config.copy_and_resolve_references()
  frozen.optim.frozen = ("vision",)
  model = build_model(config, tokenizer.vocab_size)
  before = init_state(model, *_state_args(config, model, mesh)).params
  assert set(before) <= set(PARAM_GROUPS)
  state, _, m2 = _one_step(frozen, tokenizer, batch, mesh)
  assert np.isfinite(m2["loss"])
  for group, same in (("vision", True), ("text", False), ("fusion", False)):
    changed = _leaves_changed(before[group], state.params[group])
    assert not any(changed) if same else all(changed), group

  def floats(cfg):
    tx, _ = make_optimizer(cfg.optim, cfg.train.num_steps)
    return sum(x.size for x in jax.tree.leaves(jax.eval_shape(tx.init, before)))
  vision = sum(x.size for x in jax.tree.leaves(before["vision"]))
  assert floats(config) - floats(frozen) == 2 * vision    # Adam's mu and nu

  def step_flops(cfg):
    fn = jax.jit(make_loss_and_grads(model, cfg, TextIds.of(tokenizer)))
    return compiled_flops(fn.lower(before, batch, jax.random.key(0), state.active).compile())
  # The tower's backward (weight gradients, and input gradients above the stem) is
  # not built: the step saves more than the tower's forward FLOPs.
  images = batch["image"]
  tower = jax.jit(lambda p: model.apply({"params": p}, images, method=ClusModel.encode_image))
  forward = compiled_flops(tower.lower(before).compile())
  saved = step_flops(config) - step_flops(frozen)
  assert saved > 1.2 * forward > 0, (saved, forward)

  block = config.copy_and_resolve_references()
  block.optim.frozen = ("vision/block_0",)
  state, _, _ = _one_step(block, tokenizer, batch, mesh)
  assert not any(_leaves_changed(before["vision"]["block_0"], state.params["vision"]["block_0"]))
  rest = {k: v for k, v in before["vision"].items() if k != "block_0"}
  assert all(_leaves_changed(rest, {k: state.params["vision"][k] for k in rest}))
  block_size = sum(x.size for x in jax.tree.leaves(before["vision"]["block_0"]))
  assert floats(config) - floats(block) == 2 * block_size


def _state_args(config, model, mesh):
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  _, shardings = abstract_state(model, tx, config, mesh, rules_from_config(config))
  return tx, config, shardings


def test_frozen_group_not_in_the_model_is_a_config_error(data):
  """A group name the config accepts (PARAM_GROUPS) but this model lacks: a
  pre-training has no task head."""
  config, tokenizer, _ = data
  config = config.copy_and_resolve_references()
  config.optim.frozen = ("vision", "task_head")
  mesh = create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  model = build_model(config, tokenizer.vocab_size)
  with pytest.raises(ConfigError, match=r"config.optim.frozen: 'task_head' is not in this "
                                        r"model's parameters \(the model has .*vision"):
    _state_args(config, model, mesh)
  config.optim.frozen = ("vision/no_such_block",)
  with pytest.raises(ConfigError, match=r"'vision/no_such_block' is not in this model's "
                                        r"parameters \(vision has .*block_0"):
    _state_args(config, model, mesh)
