import os
import re
import subprocess
import sys
import time

import pytest

from clusjax.config import ConfigError, resolve_mesh_shape, set_key, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import clus_base  # noqa: E402


def test_base_config_is_the_paper():
  c = clus_base.get_config()
  assert (c.model.vision.patch_size, c.model.vision.width, c.model.vision.depth) == (16, 768, 12)
  assert c.data.image_size == 224 and c.model.text.depth == 12
  assert c.train.batch_size == 2048 and c.model.embed_dim == 256
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.999, 0.01)
  assert (c.optim.learning_rate, c.optim.warmup_frac) == (1e-4, 0.05)
  assert c.model.temperature_init == 0.06
  validate(c, num_devices=8)
  validate(clus_base.get_config("tiny"), num_devices=8)


@pytest.mark.parametrize("key,value,message", [
    ("train.batch_size", 30, "config.train.batch_size=30 is not divisible"),
    ("model.vision.patch_size", 7, "config.model.vision.patch_size=7"),
    ("model.text.num_heads", 5, "config.model.text.width=128 is not divisible"),
    ("data.name", "imagenet", "config.data.name='imagenet'"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate=-1.0"),
    ("dtype", "float16", "config.dtype='float16'"),
    ("remat", "dots", "config.remat='dots' must be one of none, full, dots_saveable,"),
    ("longnet.dilation_rates", (1, 3), "config.longnet: branch (w=128, r=3)"),
    ("longnet.dilation_rates", (1,), "config.longnet.segment_lengths=(64, 128) and"),
    ("longnet.width", 33, "config.longnet.width=33 is not divisible"),
    ("data.caption_negatives", ("circle",), "config.data.caption_negatives[0]='circle'"),
    ("loss.itc.kind", "clip", "config.loss.itc.kind='clip' must be one of infonce, siglip"),
])
def test_validate_names_the_bad_key(key, value, message):
  c = clus_base.get_config("tiny")
  with c.unlocked():
    set_key(c, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c, num_devices=8)


@pytest.mark.parametrize("key,value", [("stem_max_cls", True), ("stem_width", 64)])
def test_stem_options_need_a_convolutional_stem(key, value):
  c = clus_base.get_config("tiny")
  with c.unlocked():
    c.model.vision.stem, c.model.vision.stem_max_cls = "patch", False
    c.model.vision[key] = value
  with pytest.raises(ConfigError, match=re.escape(
      f"config.model.vision.{key}={value!r} needs a convolutional config.model.vision.stem "
      "(conv, pool or cnn); it is 'patch'.")):
    validate(c, num_devices=8)
  with c.unlocked():
    c.model.vision.stem = "cnn"
  validate(c, num_devices=8)


@pytest.mark.parametrize("stem,patch,smallest", [("conv", 12, 2), ("pool", 2, 4), ("cnn", 12, 2)])
def test_a_convolutional_stem_needs_a_power_of_two_patch(stem, patch, smallest):
  c = clus_base.get_config("tiny")
  with c.unlocked():
    c.model.vision.stem, c.model.vision.patch_size, c.data.image_size = stem, patch, 48
  with pytest.raises(ConfigError, match=re.escape(
      f"config.model.vision.stem={stem!r} needs a power-of-two config.model.vision.patch_size "
      f">= {smallest}; it is {patch}.")):
    validate(c, num_devices=8)


def test_mesh_resolution():
  assert resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == dict(data=2, fsdp=2, tensor=2)
  with pytest.raises(ConfigError, match="config.mesh"):
    resolve_mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)


def _run_main(*args):
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"),
                         "--config=" + os.path.join(ROOT, "configs", "clus_base.py:tiny"),
                         "--workdir=/tmp/clusjax_never_created", *args],
                        capture_output=True, text=True, timeout=60)
  return proc, time.perf_counter() - start


@pytest.mark.parametrize("settings,message", [
    ({"loss.itc.kind": "label_smooth", "loss.itc.label_smoothing": 0.0},
     "config.loss.itc.label_smoothing=0.0 must be > 0.0"),
    ({"loss.itc.kind": "softclip", "loss.itc.softclip.beta": 0.0},
     "config.loss.itc.softclip.beta=0 with symmetric_kl=True"),
    ({"loss.itc.kind": "softclip", "loss.itc.softclip.beta": 1.5},
     "config.loss.itc.softclip.beta=1.5 must be <= 1.0"),
    ({"loss.itc.kind": "siglip", "data.caption_negatives": ("circle square",)},
     "do not work with config.loss.itc.kind='siglip'"),
])
def test_itc_settings_are_checked_for_their_kind(settings, message):
  c = clus_base.get_config("tiny")
  for key, value in settings.items():
    set_key(c, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c, num_devices=8)
  c.loss.itc.kind = "infonce"   # the other kinds' settings are not read
  validate(c, num_devices=8)


@pytest.mark.parametrize("flag,expected", [
    ("--config.model.no_such_key=1", "config.model.no_such_key"),
    ("--config.train.batch_size=abc", "config.train.batch_size"),
    ("--config.model.vision.patch_size=7", "config.model.vision.patch_size=7"),
    ("--config.train.batch_size=12", "config.train.batch_size=12"),
])
def test_cli_rejects_bad_flags_fast(flag, expected):
  proc, seconds = _run_main(flag)
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr
  assert "Traceback" not in proc.stderr
  # Before anything compiles (a compile takes ~40 s); loose for a loaded machine.
  assert seconds < 20, seconds
  assert not os.path.exists("/tmp/clusjax_never_created")


class _FakeDevice:
  """What device_grid reads of a device: its id, kind and slice."""
  platform = device_kind = "cpu"

  def __init__(self, i, per_slice):
    self.id, self.process_index = i, i // per_slice

  def __repr__(self):
    return f"d{self.id}"


def test_dcn_mesh_puts_each_slice_in_its_own_block():
  from clusjax.parallel.mesh import device_grid
  devices = [_FakeDevice(i, 4) for i in range(8)]    # 2 processes (slices) x 4 devices
  config = {"data": -1, "fsdp": 2, "tensor": 1, "dcn": {"data": 2}}
  grid = device_grid(config, devices)
  assert grid.shape == (4, 2, 1)
  # data rows 0-1 are slice 0, rows 2-3 slice 1: only the data axis crosses DCN.
  assert [[d.process_index for d in row.ravel()] for row in grid] == [[0, 0], [0, 0],
                                                                       [1, 1], [1, 1]]
  fsdp_over_dcn = device_grid({"data": 2, "fsdp": -1, "tensor": 1, "dcn": {"fsdp": 2}}, devices)
  assert {d.process_index for d in fsdp_over_dcn[:, :2].ravel()} == {0}
  assert {d.process_index for d in fsdp_over_dcn[:, 2:].ravel()} == {1}
  # No DCN: the plain reshape, as before.
  assert [d.id for d in device_grid({"data": -1, "fsdp": 1, "tensor": 1}, devices).ravel()] == \
      list(range(8))
  with pytest.raises(ValueError, match="asks for 4 slices, but the 8 devices form 2 processes"):
    device_grid({"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"data": 4}}, devices)
  with pytest.raises(ConfigError, match=r"config.mesh.dcn.fsdp=3 does not divide the fsdp axis"):
    device_grid({"data": 2, "fsdp": 2, "tensor": 1, "dcn": {"fsdp": 3}}, devices[:4])
  with pytest.raises(ConfigError, match="config.mesh.dcn.pipeline is not a mesh axis"):
    device_grid({"data": -1, "fsdp": 1, "tensor": 1, "dcn": {"pipeline": 2}}, devices)


# --- downstream configs (configs/retrieval.py, vqa.py, nlvr2.py) ---

def _task(name, arg=None):
  import importlib
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", ["retrieval", "vqa", "nlvr2"])
def test_task_configs_validate_and_keep_the_pretraining_towers(name):
  for arg in (None, "tiny"):
    c = _task(name, arg)
    validate(c, num_devices=8)
    base = clus_base.get_config(arg)
    assert c.model.to_dict() == base.model.to_dict()   # init_from a workdir of the same variant
    assert c.task == name and not c.clustering.enabled and c.loss.mlm_weight == 0
  with pytest.raises(ValueError, match="nonexistent"):
    _task(name, "nonexistent")


def test_task_configs_follow_paper_table_1():
  vqa, nlvr2, retrieval = _task("vqa"), _task("nlvr2"), _task("retrieval")
  assert (vqa.optim.learning_rate, vqa.train.batch_size, vqa.data.image_size) == (2e-5, 256, 256)
  assert (nlvr2.optim.learning_rate, nlvr2.optim.weight_decay, nlvr2.data.image_size) == (
      3.5e-5, 0.05, 384)
  assert (retrieval.optim.learning_rate, retrieval.train.batch_size,
          retrieval.data.image_size) == (3.5e-5, 1024, 384)
  assert vqa.optim.b2 == nlvr2.optim.b2 == 0.995


@pytest.mark.parametrize("name,key,value,message", [
    ("vqa", "finetune.loss", "focal", "config.finetune.loss='focal' must be one of ce, supcon"),
    ("vqa", "loss.task_weight", 0.0, "config.task='vqa' trains its head with"),
    ("vqa", "eval.evaluators", ("retrieval",), "'retrieval', which does not evaluate"),
    ("vqa", "data.name", "tfds", "config.data.name='tfds' has no records for config.task='vqa'"),
    ("retrieval", "data.name", "easy_vqa", "config.data.name='easy_vqa' has no records"),
    ("retrieval", "loss.task_weight", 1.0, "config.task='retrieval' has none"),
    ("retrieval", "data.captions_per_image", 8, "config.data.captions_per_image=8"),
    ("vqa", "finetune.clce_lam", 1.5, "config.finetune.clce_lam=1.5 must be <= 1.0"),
    ("vqa", "finetune.supcon_temperature", 0.0, "config.finetune.supcon_temperature=0.0"),
    ("nlvr2", "task", "captioning", "config.task='captioning' must be one of"),
])
def test_bad_task_values_name_the_key(name, key, value, message):
  c = _task(name, "tiny")
  set_key(c, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)


def test_easy_vqa_splits_are_checked():
  c = _task("vqa", "tiny")
  c.data.name = "easy_vqa"
  validate(c)
  c.data.eval_split = "val"
  with pytest.raises(ConfigError, match=re.escape("config.data.eval_split='val': easy-VQA")):
    validate(c)


def test_shapes_caption_templates_agree():
  from clusjax.config import SHAPES_CAPTION_TEMPLATES
  from clusjax.data.shapes import NUM_TEMPLATES
  assert SHAPES_CAPTION_TEMPLATES == NUM_TEMPLATES


def test_check_init_from_names_the_differing_key(tmp_path):
  from clusjax import workdir as wd
  from clusjax.config import check_init_from
  pre = clus_base.get_config("tiny")
  (tmp_path / wd.CHECKPOINT_DIR).mkdir()
  wd.save_config(pre, str(tmp_path))
  c = _task("vqa", "tiny")
  c.init_from = str(tmp_path)
  c.data.image_size = 96   # resampled, not refused
  check_init_from(c)
  c.model.text.depth = 2
  with pytest.raises(ConfigError, match=re.escape("config.model.text.depth=2 but config.init_from")):
    check_init_from(c)
  c.model.text.depth = pre.model.text.depth
  # A workdir from before model.itm_head_product (no such key) was trained without it.
  del pre.model["itm_head_product"]
  wd.save_config(pre, str(tmp_path))
  with pytest.raises(ConfigError, match=re.escape(
      "config.model.itm_head_product=True but config.init_from")):
    check_init_from(c)
  c.model.itm_head_product = False
  check_init_from(c)
  c.init_from = str(tmp_path / "nothing")
  with pytest.raises(ConfigError, match="not a trained clusjax workdir"):
    check_init_from(c)


# --- every bad value refused at start (issue 23): a table of rules, one line per key ---

def _nan():
  return float("nan")


@pytest.mark.parametrize("key,value,message", [
    ("optim.learning_rate", _nan(), "config.optim.learning_rate=nan must be a finite number"),
    ("optim.learning_rate", float("inf"), "config.optim.learning_rate=inf must be a finite"),
    ("clustering.eps", _nan(), "config.clustering.eps=nan must be a finite number"),
    ("clustering.sinkhorn_epsilon", _nan(), "config.clustering.sinkhorn_epsilon=nan must be"),
    ("clustering.temperature", _nan(), "config.clustering.temperature=nan must be"),
    ("loss.itc.softclip.beta", _nan(), "config.loss.itc.softclip.beta=nan"),   # not read: still
    ("optim.b1", 1e300, "config.optim.b1=1e+300 must be a finite number (float32"),
    ("data.eval_split", "no_such_value",
     "config.data.eval_split='no_such_value': the built-in shapes have the splits train, val"),
    ("data.eval_split", "", "config.data.eval_split='' must name a split"),
    ("data.train_split", "", "config.data.train_split='' must name a split"),
    ("data.train_split", "tset", "config.data.train_split='tset': the built-in shapes have"),
    ("data.image_size", 10**12, "config.data.image_size=1000000000000 is out of range"),
    ("data.image_size", 1_000_000, "config.train.batch_size=64 x config.data.image_size=1000000^2"
                                   " x 12 bytes = 7.68e+14 bytes for a training batch of images"),
    ("train.batch_size", 10**9, "config.train.batch_size=1000000000 x config.data.image_size=64^2"),
    ("eval.num_examples", 10**7, "config.eval.num_examples=10000000^2 x 4 bytes"),
    ("mesh.data", -7, "config.mesh.data=-7 must be a positive integer or -1"),
    ("mesh.fsdp", -1, "config.mesh: only one axis may be -1, got ['data', 'fsdp']"),
    ("data.tokenizer", "/no/such/sp.model", "config.data.tokenizer='/no/such/sp.model' does not"),
    ("data.jsonl.test", "/no/such.jsonl", "config.data.jsonl.test='/no/such.jsonl' does not"),
    ("seed", True, "config.seed=True must be an integer"),
    ("model.vision.stem", "vit", "config.model.vision.stem='vit' must be one of patch, conv, pool, cnn"),
    ("data.shapes_backgrounds", ("dark", "sky"), "config.data.shapes_backgrounds=('dark', 'sky')"),
])
def test_bad_values_are_refused_before_anything_runs(key, value, message):
  c = clus_base.get_config("tiny")
  set_key(c, key, value)
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)


def test_every_key_of_every_config_has_a_rule():
  """A new key is one line of clusjax.config.RULES (or config_tasks.TASK_RULES)."""
  import glob
  import ml_collections
  from clusjax.config import RULES
  from clusjax.config_tasks import TASK_RULES
  ruled = {rule[0] for rule in RULES + TASK_RULES}

  def leaves(node, prefix=""):
    for key, value in node.items():
      if isinstance(value, ml_collections.ConfigDict):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield prefix + key
  names = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))]
  unruled = {}
  for name in sorted(set(names) - {"downstream", "__init__"}):
    for arg in (None, "tiny"):
      for key in set(leaves(_task(name, arg))) - ruled:
        unruled.setdefault(key, f"configs/{name}.py")
  assert not unruled, ("keys without a rule: add a line (key, kind, constraint[, when]) to "
                       f"RULES in clusjax/config.py: {unruled}")


def test_choices_kept_here_agree_with_their_modules():
  from clusjax import config, config_tasks
  from clusjax.data import shapes, shapes_v2, sources, vqa
  from clusjax.eval import retrieval
  assert set(config_tasks.SHAPES_SPLITS) == set(sources._SHAPES_SPLITS)
  assert config_tasks.EASY_VQA_SPLITS == vqa.EASY_VQA_SPLITS
  assert config.SHAPES_VERSIONS == shapes.VERSIONS
  assert config.SHAPES_BACKGROUNDS == shapes_v2.BACKGROUNDS
  assert config.RERANK_SCORES == retrieval.RERANK_SCORES


def _jsonl_config(tmp_path, **jsonl):
  c = clus_base.get_config("tiny")
  c.data.name, c.eval.evaluators = "jsonl", ("retrieval",)
  for split, name in jsonl.items():
    (tmp_path / name).write_text("")
    c.data.jsonl[split] = str(tmp_path / name)
  return c


def test_jsonl_splits_are_the_splits_with_a_file(tmp_path):
  c = _jsonl_config(tmp_path, train="train.jsonl")
  with pytest.raises(ConfigError, match=re.escape(
      "config.data.eval_split='test': config.data.jsonl.test is empty")):
    validate(c)
  c.train.eval_at_end = False     # the eval split is not read
  validate(c)
  c = _jsonl_config(tmp_path, train="train.jsonl", val="val.jsonl")
  c.data.eval_split = "validation"
  validate(c)
  c.data.eval_split = "dev"
  with pytest.raises(ConfigError, match="config.data.eval_split='dev': a JSONL data set has"):
    validate(c)
  c.data.eval_split, c.data.train_split = "val", "test"
  with pytest.raises(ConfigError, match="config.data.train_split='test': config.data.jsonl.test"):
    validate(c)


def test_tfds_splits_are_read_from_the_prepared_dataset_info(tmp_path):
  import json
  info = tmp_path / "coco_captions" / "2014" / "1.1.0" / "dataset_info.json"
  info.parent.mkdir(parents=True)
  info.write_text(json.dumps({"splits": [{"name": "train"}, {"name": "val"}, {"name": "test"}]}))
  c = clus_base.get_config("tiny")
  c.data.update(name="tfds", tfds_name="coco_captions", data_dir=str(tmp_path))
  c.eval.evaluators = ("retrieval",)
  for split in ("test", "val[:10%]", "train+val"):
    c.data.eval_split = split
    validate(c)
  c.data.eval_split = "validation"
  with pytest.raises(ConfigError, match=re.escape(
      "config.data.eval_split='validation': TFDS 'coco_captions' has no split 'validation'; "
      "it has test, train, val.")):
    validate(c)
  c.data.eval_split = "train["
  with pytest.raises(ConfigError, match="not a TFDS split"):
    validate(c)
  c.data.tfds_name = "not_prepared"    # not known cheaply: TFDS names it when opened
  c.data.eval_split = "validation"
  validate(c)


@pytest.mark.parametrize("key,value,message", [
    ("optim.b2", 1.0, "config.optim.b2=1.0 must be < 1.0"),        # Adam divides by 1 - b2^t
    ("model.dropout", 1.0, "config.model.dropout=1.0 must be < 1.0"),
    ("optim.learning_rate", 1e-300, "config.optim.learning_rate=1e-300 is 0 in float32"),
    ("data.max_text_len", 10**6, "config.data.max_text_len=1000000^2 x 4 bytes"),
    ("data.num_workers", 10**6, "config.data.num_workers=1000000 x 104857600 bytes"),
    ("data.image_size", 160_000, "makes 400000000 image tokens"),
])
def test_values_that_would_break_the_arithmetic_are_refused(key, value, message):
  c = clus_base.get_config("tiny")
  set_key(c, key, value)
  if key == "data.image_size":
    # One image of each batch and of the data set would fit; its attention would not.
    c.train.batch_size = c.eval.batch_size = c.data.shapes_num_train = 1
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(c)
