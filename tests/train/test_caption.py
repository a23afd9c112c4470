"""Captioning fine-tune (configs/caption.py): the shapes caption source with its novel
split, a micro fine-tune from a pre-training workdir, its evaluator and load_finetuned."""
import json

import numpy as np
import pytest

import clusjax
from clusjax import workdir as wd
from clusjax.config import ConfigError, validate
from clusjax.data import make_source, shapes
from clusjax.data.captions import parse_novel_objects
from clusjax.eval import evaluate
from tests.conftest import task_micro_config
from tests.train.conftest import finetune_of


def test_shapes_caption_source_novel_split(shapes_data_dir):
  config = task_micro_config("caption", shapes_data_dir)
  novel = parse_novel_objects(config.data.novel_objects)
  train_src = make_source(config.data, "train", "caption")
  test_src = make_source(config.data, "test", "caption")
  assert 0 < len(train_src) < config.data.shapes_num_train
  assert len(test_src) == config.data.shapes_num_test
  for i in range(len(train_src)):
    info = train_src.info(i)
    assert not info["novel"]
    assert not {(shapes.COLOURS.index(c), shapes.KINDS.index(k))
                for c, k in info["objects"]} & novel
  flags = [test_src.info(i)["novel"] for i in range(len(test_src))]
  assert any(flags) and not all(flags)
  r = test_src[3]
  refs = test_src.info(3)["references"]
  assert r["caption"] == refs[0] and len(refs) == shapes.NUM_TEMPLATES
  # Reading order: top before left before center before right before bottom.
  order = ("at the top", "on the left", "in the center", "on the right", "at the bottom")
  for i in range(len(test_src)):
    cap = test_src[i]["caption"]
    where = [cap.index(p) for p in order if p in cap]
    assert where == sorted(where), cap
  with pytest.raises(ValueError, match=r"novel_objects\[0\]"):
    parse_novel_objects(("purple circle",))


def test_caption_config_follows_table_1_and_keeps_the_towers():
  from configs import caption, clus_base
  for arg in (None, "tiny"):
    c = caption.get_config(arg)
    validate(c, num_devices=8)
    assert c.model.to_dict() == clus_base.get_config(arg).model.to_dict()
    assert c.task == "caption" and c.loss.mlm_weight == 0 and not c.clustering.enabled
  c = caption.get_config()
  assert (c.optim.learning_rate, c.train.batch_size, c.data.image_size,
          c.optim.weight_decay) == (5e-5, 128, 512, 0.01)


def test_caption_config_errors(shapes_data_dir):
  config = task_micro_config("caption", shapes_data_dir)
  validate(config)
  config.caption.mask_ratio, config.caption.decode_query = 0.0, "mask"
  with pytest.raises(ConfigError, match="decode_query='mask'"):
    validate(config)
  config.caption.decode_query = "next"
  validate(config)
  config.caption.max_len = config.data.max_text_len
  with pytest.raises(ConfigError, match="caption.max_len"):
    validate(config)


@pytest.fixture(scope="module")
def caption_run(trained_workdir, shapes_data_dir, tmp_path_factory):
  return finetune_of(trained_workdir, "caption", shapes_data_dir, tmp_path_factory,
                     train__num_steps=2, train__checkpoint_every=2, eval__num_examples=32)


def test_caption_finetune_evaluates_and_writes_captions(caption_run):
  config, workdir = caption_run
  model = clusjax.load_finetuned(str(workdir))
  results = evaluate(config, model, str(workdir))
  for key in ("caption/bleu4", "caption/cider", "caption/exact_match", "caption/cider_novel",
              "caption/cider_in_domain", "caption/rouge_l", "caption/names_objects"):
    assert key in results and np.isfinite(results[key]), key
  assert results["caption/num_examples"] == 32
  saved = json.loads((workdir / wd.EVAL_RESULTS_FILE).read_text())
  assert saved["caption/bleu4"] == results["caption/bleu4"]
  lines = [json.loads(line) for line in (workdir / "captions.jsonl").read_text().splitlines()]
  assert len(lines) == 32 and {"image_id", "caption", "references", "novel"} <= set(lines[0])
  # load_finetuned(W).caption on the same images gives the evaluator's captions.
  test = make_source(config.data, "test", "caption")
  from clusjax.data import iterate_eval
  batch = next(iterate_eval(test.by_image(), batch_size=8, image_size=32,
                            tokenizer=model.tokenizer, max_text_len=config.data.max_text_len,
                            num_examples=8))
  captions = model.caption(batch["image"], beam_size=config.caption.beam_size)
  assert captions == [line["caption"] for line in lines[:8]]
  assert all(isinstance(c, str) for c in model.caption(batch["image"][:2], beam_size=1,
                                                       max_len=5))


def test_caption_rejects_bad_inputs(caption_run):
  _, workdir = caption_run
  model = clusjax.load_finetuned(str(workdir))
  good = np.zeros((2, 32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match="images uint8"):
    model.caption(good.astype(np.float32))
  with pytest.raises(ValueError, match="images uint8"):
    model.caption(np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(ValueError, match="beam_size"):
    model.caption(good, beam_size=0)
  with pytest.raises(ValueError, match="max_len"):
    model.caption(good, max_len=500)
  assert model.caption(good[:0]) == []
  with pytest.raises(ValueError, match="caption"):
    model.answer(good, ["what colour?", "what colour?"])
