"""Fine-tuning from a pre-training workdir (configs/retrieval.py, vqa.py, nlvr2.py):
init_from, the position-embedding resampling, resume, the evaluators and load_finetuned."""
import json
import os
import shutil
import subprocess
import sys
import time

import flax.linen
import jax
import numpy as np
import PIL.Image
import pytest
from flax import traverse_util

import clusjax
from clusjax import workdir as wd
from clusjax.data import iterate_eval, make_source
from clusjax.data.tasks import task_targets
from clusjax.eval import evaluate
from clusjax.eval.downstream import VqaEvaluator
from clusjax.eval.retrieval import load_eval_pairs
from clusjax.models.clus import build_model
from clusjax.parallel.mesh import create_mesh, rules_from_config
from clusjax.train.loop import train
from clusjax.train.optimizer import make_optimizer
from clusjax.train.restore import load_init_from, resample_pos_embed, restore_model
from clusjax.train.state import abstract_state, init_state
from tests.conftest import ROOT, micro_flags, subprocess_env, task_micro_config
from tests.train.conftest import finetune_of


def _one_device():
  return create_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])


def test_init_from_copies_every_shared_leaf(trained_workdir, shapes_data_dir):
  """Every parameter the pre-training workdir has is copied exactly; the task head is
  new (as initialised), and so is the optimizer state."""
  config = task_micro_config("vqa", shapes_data_dir)
  _, source, active, source_config, tokenizer = restore_model(str(trained_workdir), _one_device())
  config.clustering.max_prototypes = source_config.clustering.max_prototypes
  model = build_model(config, tokenizer.vocab_size)
  tx, _ = make_optimizer(config.optim, config.train.num_steps)
  mesh = _one_device()
  _, shardings = abstract_state(model, tx, config, mesh, rules_from_config(config))
  fresh = init_state(model, tx, config, shardings)
  said = []
  state = load_init_from(fresh, str(trained_workdir), mesh, rules_from_config(config),
                         log=said.append)
  mine, theirs = (traverse_util.flatten_dict(p) for p in (state.params, source))
  init = traverse_util.flatten_dict(fresh.params)
  new = {p for p in mine if p not in theirs}
  assert new and all(p[0] == "task_head" for p in new)
  for path, value in mine.items():
    expected = init[path] if path in new else theirs[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected), err_msg=str(path))
  np.testing.assert_array_equal(np.asarray(state.active), np.asarray(active))
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The restore names the step it loaded, then init_from says what it copied.
  said = [line for line in said if line.startswith("init_from")]
  assert len(said) == 1 and "new: task_head/" in said[0] and "step 2" in said[0]


def test_head_product_appends_the_product_of_the_fused_cls(shapes_data_dir):
  """finetune.head_product: the head reads [image CLS, text CLS, image CLS * text CLS]
  of the same fusion (NLVR2: per pair); off, the features are the first two."""
  config = task_micro_config("nlvr2", shapes_data_dir)
  config.finetune.head_product = True
  model = build_model(config, 64)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  images = jax.numpy.asarray(rng.integers(0, 256, (2, size, size, 3)), jax.numpy.uint8)
  ids = jax.numpy.asarray(rng.integers(4, 64, (2, 8)), jax.numpy.int32)
  mask = jax.numpy.ones((2, 8), bool)
  params = flax.linen.meta.unbox(model.init(jax.random.key(0), images, ids, mask))
  w = config.model.text.width
  assert params["params"]["task_head"]["hidden"]["kernel"].shape[0] == 2 * 3 * w

  def features(m):
    def fn(module):
      img, _ = module.encode_image(images)
      txt, _ = module.encode_text(ids, mask)
      return module.task_features(img, txt, mask, img[::-1])
    return np.asarray(m.apply(params, method=fn))
  plain = features(model.clone(head_product=False))
  both = features(model)
  assert plain.shape == (2, 4 * w) and both.shape == (2, 6 * w)
  for pair in range(2):
    cls = plain[:, 2 * w * pair:2 * w * (pair + 1)]
    out = both[:, 3 * w * pair:3 * w * (pair + 1)]
    np.testing.assert_allclose(out[:, :2 * w], cls, rtol=1e-6)
    np.testing.assert_allclose(out[:, 2 * w:], cls[:, :w] * cls[:, w:], rtol=1e-5, atol=1e-7)
    assert np.abs(out[:, 2 * w:]).max() > 0


def test_resample_pos_embed_is_bicubic_and_keeps_cls():
  """Against Pillow's bicubic resize of each channel (Keys' a = -0.5, as jax.image)."""
  rng = np.random.default_rng(0)
  n, m, width = 4, 7, 3
  pos = rng.normal(size=(1, 1 + n * n, width)).astype(np.float32)
  out = np.asarray(resample_pos_embed(pos, 1 + m * m))
  assert out.shape == (1, 1 + m * m, width)
  np.testing.assert_array_equal(out[0, 0], pos[0, 0])
  grid = pos[0, 1:].reshape(n, n, width)
  for c in range(width):
    ref = np.asarray(PIL.Image.fromarray(grid[..., c], mode="F").resize(
        (m, m), PIL.Image.BICUBIC))
    np.testing.assert_allclose(out[0, 1:, c].reshape(m, m), ref, atol=2e-4)
  np.testing.assert_allclose(resample_pos_embed(pos, 1 + n * n), pos, atol=1e-6)
  with pytest.raises(ValueError, match="square"):
    resample_pos_embed(pos, 1 + 10)


MAIN = [sys.executable, os.path.join(ROOT, "launch", "main.py")]


def test_init_from_with_other_towers_exits_1_naming_the_key(trained_workdir, shapes_data_dir,
                                                           tmp_path):
  start = time.perf_counter()
  proc = subprocess.run(
      MAIN + ["--config=" + os.path.join(ROOT, "configs", "vqa.py:tiny"),
              f"--workdir={tmp_path / 'w'}", f"--config.init_from={trained_workdir}"]
      + micro_flags(shapes_data_dir, model__vision__width=48),
      capture_output=True, text=True, env=subprocess_env(), timeout=120)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "model.vision.width=48" in proc.stderr and "32" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
  assert time.perf_counter() - start < 30
  assert not (tmp_path / "w").exists()


def _losses(workdir):
  return [json.loads(line)["loss"] for line in
          (workdir / wd.METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def vqa_run(trained_workdir, shapes_data_dir, tmp_path_factory):
  """A shapes-VQA fine-tune of the shared workdir (4 steps, checkpoints at 2 and 4)."""
  return finetune_of(trained_workdir, "vqa", shapes_data_dir, tmp_path_factory,
                     train__num_steps=4, train__checkpoint_every=2, eval__num_examples=48)


def test_vqa_finetune_resumes_exactly(vqa_run, trained_workdir):
  """A run that lost its last checkpoint resumes from step 2 (params, optimizer, data
  position) and logs the losses of the uninterrupted run."""
  config, workdir = vqa_run
  again = workdir.parent / "vqa_resumed"
  shutil.copytree(workdir, again)
  shutil.rmtree(again / wd.CHECKPOINT_DIR / "4")
  train(config, str(again))
  full, resumed = _losses(workdir), _losses(again)
  assert len(full) == len(resumed) == 4
  np.testing.assert_allclose(resumed, full, rtol=1e-5)
  # The workdir holds what a resume and load_finetuned need: its tokenizer and answers.
  assert (workdir / wd.TOKENIZER_FILE).read_bytes() == (
      trained_workdir / wd.TOKENIZER_FILE).read_bytes()
  assert json.loads((workdir / wd.ANSWERS_FILE).read_text())


def test_load_finetuned_answer_reproduces_the_evaluator(vqa_run):
  config, workdir = vqa_run
  model = clusjax.load_finetuned(str(workdir))
  scores, types, predicted = VqaEvaluator(config).scores(model)
  results = evaluate(config, model)
  assert results["vqa/num_examples"] == len(scores) == 48
  np.testing.assert_allclose(results["vqa/accuracy"], scores.mean())
  source = make_source(config.data, config.data.eval_split, "vqa")
  images, questions, targets = [], [], []
  for batch in iterate_eval(source, batch_size=16, image_size=config.data.image_size,
                            tokenizer=model.tokenizer, max_text_len=config.data.max_text_len,
                            num_examples=48, targets=task_targets(config, model.answers)):
    images.append(batch["image"])
    questions += batch["caption"]
    targets.append(batch["target_scores"])
  answers = model.answer(np.concatenate(images), questions)
  assert answers == predicted
  index = [model.answers.index(a) for a in answers]
  accuracy = np.concatenate(targets)[np.arange(48), index].mean()
  np.testing.assert_allclose(accuracy, results["vqa/accuracy"], rtol=1e-6)
  assert {f"vqa/accuracy/{t}" for t in types} <= set(results)
  with pytest.raises(ValueError, match=r"questions\[1\]"):
    model.answer(np.concatenate(images)[:2], ["what colour?", " "])
  with pytest.raises(ValueError, match="images uint8"):
    model.answer(np.zeros((1, 8, 8, 3), np.uint8), ["what colour?"])
  with pytest.raises(ValueError, match="questions has 1 entries for 2"):
    model.answer(np.concatenate(images)[:2], ["what colour?"])
  with pytest.raises(ValueError, match="nlvr2"):
    model.verify(images[0][:1], images[0][:1], ["both images contain a circle."])
  with pytest.raises(ValueError, match="pre-training workdir"):
    clusjax.load_finetuned(config.init_from)


def test_nlvr2_finetune_verify_and_eval(trained_workdir, shapes_data_dir, tmp_path):
  config = task_micro_config("nlvr2", shapes_data_dir, train__num_steps=2,
                             train__checkpoint_every=2, eval__num_examples=32)
  config.init_from = str(trained_workdir)
  train(config, str(tmp_path))
  model = clusjax.load_finetuned(str(tmp_path))
  results = evaluate(config, model, str(tmp_path))
  assert results["nlvr2/num_examples"] == 32 and 0 <= results["nlvr2/accuracy"] <= 1
  assert any(k.startswith("nlvr2/accuracy/") for k in results)
  source = make_source(config.data, "test", "nlvr2")
  batch = next(iterate_eval(source, batch_size=4, image_size=32, tokenizer=model.tokenizer,
                            max_text_len=config.data.max_text_len, num_examples=4))
  p = model.verify(batch["image"], batch["image2"], batch["caption"])
  assert p.shape == (4,) and p.dtype == np.float32 and np.all((p >= 0) & (p <= 1))
  with pytest.raises(ValueError, match="right_images"):
    model.verify(batch["image"], batch["image2"][:3], batch["caption"])
  with pytest.raises(ValueError, match="left_images uint8"):
    model.verify(batch["image"].astype(np.float32), batch["image2"], batch["caption"])
  with pytest.raises(ValueError, match=r"statements\[0\]"):
    model.verify(batch["image"], batch["image2"], [""] * 4)


def test_retrieval_eval_groups_captions_by_image(shapes_data_dir, trained_workdir):
  """captions_per_image = 3: each test image once, text_image names its 3 captions."""
  config = task_micro_config("retrieval", shapes_data_dir, eval__num_examples=30)
  model = clusjax.load_pretrained(str(trained_workdir))
  images, captions, text_image = load_eval_pairs(config, model.tokenizer, 30)
  assert images.shape[0] == 10 and len(captions) == 30
  np.testing.assert_array_equal(text_image, np.repeat(np.arange(10), 3))
  assert len(set(captions[:3])) == 3
  results = evaluate(config, model)
  assert results["retrieval/num_images"] == 10 and results["retrieval/num_examples"] == 30
  assert results["retrieval/rsum"] == pytest.approx(
      sum(results[f"retrieval/{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))
  for d in ("i2t", "t2i"):   # re-ranking's R@1 change, inside its bootstrap interval
    gain = results[f"retrieval/rerank_{d}_r1_gain"]
    assert gain == pytest.approx(results[f"retrieval/rerank_{d}_r1"] - results[f"retrieval/{d}_r1"])
    assert results[f"retrieval/rerank_{d}_r1_gain_low"] <= gain
    assert gain <= results[f"retrieval/rerank_{d}_r1_gain_high"]
