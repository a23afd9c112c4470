"""launch/prepare_data.py and clusjax.data.builders: WebDataset shards and Karpathy JSON
-> TFDS ArrayRecord, in one process and on Apache Beam (DirectRunner)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clusjax.data import builders
from clusjax.data.builders import webdataset
from clusjax.data.sources import make_source
from tests.conftest import ROOT, micro_config, subprocess_env
from tests.data import generated_pairs as gen

PREPARE = os.path.join(ROOT, "launch", "prepare_data.py")
NUM_PAIRS, NUM_SHARDS, TEST_FRACTION = 2000, 8, 0.05
ARGS = dict(image_size=32, max_image_bytes=gen.HUGE_LIMIT, keep_json=["url"],
            test_fraction=TEST_FRACTION)


def _read(data_dir, name, split):
  from clusjax.data.sources import _open_tfds
  records, _ = _open_tfds(name, split, str(data_dir))
  return [records[i] for i in range(len(records))]


def _beam_options():
  from apache_beam.options.pipeline_options import PipelineOptions
  # in_memory: the same runner code as --num_workers=N without spawning workers (seconds).
  return PipelineOptions(["--runner=DirectRunner", "--direct_running_mode=in_memory"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """2,000 generated pairs + 5 exact duplicates in 8 shards, 3% of members damaged."""
  folder = tmp_path_factory.mktemp("shards")
  samples = gen.make_samples(NUM_PAIRS, corrupt_fraction=0.03, num_duplicates=5)
  gen.write_shards(str(folder), samples, NUM_SHARDS)
  return str(folder / "{00000..00007}.tar"), samples


@pytest.fixture(scope="module")
def built(shards, tmp_path_factory):
  """The shards built in one process and on Beam: (data dir, {engine: summary})."""
  data_dir = tmp_path_factory.mktemp("tfds")
  pattern, _ = shards
  out = {"local": builders.prepare("webdataset", input=pattern, data_dir=str(data_dir),
                                   name="pairs_local", **ARGS),
         "beam": builders.prepare("webdataset", input=pattern, data_dir=str(data_dir),
                                  name="pairs_beam", beam=True, beam_options=_beam_options(),
                                  **ARGS)}
  return data_dir, out


def test_single_process_and_beam_give_the_same_examples(shards, built):
  _, samples = shards
  data_dir, out = built
  expected = gen.expected_skips(samples)
  assert sum(expected.values()) == round(0.03 * NUM_PAIRS)
  for engine in ("local", "beam"):
    assert out[engine]["skipped"] == expected, engine
    assert out[engine]["duplicates"] == 5, engine
    assert sum(out[engine]["splits"].values()) == NUM_PAIRS - sum(expected.values())
  for split in ("train", "test"):
    local, beam = _read(data_dir, "pairs_local", split), _read(data_dir, "pairs_beam", split)
    # The same records (content hash, stored bytes, kept fields) in the same order.
    assert [r["content_hash"] for r in local] == [r["content_hash"] for r in beam]
    assert all(a["image"] == b["image"] and a["url"] == b["url"] for a, b in zip(local, beam))
  assert 0 < out["local"]["splits"]["test"] < 3 * TEST_FRACTION * NUM_PAIRS
  record = _read(data_dir, "pairs_local", "train")[0]
  n = int(record["key"].decode().split("/")[1])   # "0000k.tar/<pair index>"
  assert record["caption"].decode() == gen.caption(n)
  assert record["url"].decode() == f"http://x/{n}"


def test_images_are_shrunk_to_the_shorter_side(built):
  import io
  import PIL.Image
  data_dir, _ = built
  for r in _read(data_dir, "pairs_local", "test")[:5]:
    with PIL.Image.open(io.BytesIO(r["image"])) as im:
      assert min(im.size) == 32 and im.format == "JPEG"   # 48 x 40 -> 38 x 32


@pytest.mark.slow   # ~1-5 min on the 2-core machine: two runs' compiles and an evaluation each
def test_training_on_the_set_equals_training_on_the_same_jsonl(built, tmp_path):
  """:tiny (micro) trains on the prepared set to the same losses as on the same
  records, in the same order, read through a JSONL file; evaluation runs on both."""
  from clusjax.api import load_pretrained
  from clusjax.eval import evaluate
  from clusjax.train.loop import train
  data_dir, _ = built
  lines = {}
  for split in ("train", "test"):
    rows = []
    for i, r in enumerate(_read(data_dir, "pairs_local", split)):
      path = tmp_path / f"{split}{i}.jpg"
      path.write_bytes(r["image"])
      rows.append(json.dumps({"image": path.name, "caption": r["caption"].decode()}))
    lines[split] = tmp_path / f"{split}.jsonl"
    lines[split].write_text("\n".join(rows) + "\n")
  common = dict(train__num_steps=3, train__checkpoint_every=3, clustering__cluster_every=100,
                eval__evaluators=("retrieval",), eval__num_examples=32)
  tfds_config = micro_config(data_dir, data__name="tfds", data__tfds_name="pairs_local", **common)
  jsonl_config = micro_config(tmp_path / "unused", data__name="jsonl", **common)
  jsonl_config.data.jsonl.train, jsonl_config.data.jsonl.test = map(str, (lines["train"],
                                                                          lines["test"]))
  logs, evals = {}, {}
  for name, config in (("tfds", tfds_config), ("jsonl", jsonl_config)):
    workdir = str(tmp_path / name)
    train(config, workdir)
    logs[name] = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    evals[name] = evaluate(config, load_pretrained(workdir), workdir)   # as main.py does
  losses = {k: [m["loss"] for m in v if "loss" in m] for k, v in logs.items()}
  assert len(losses["tfds"]) == 3
  np.testing.assert_allclose(losses["tfds"], losses["jsonl"], rtol=1e-5, atol=1e-5)
  assert evals["tfds"].keys() == evals["jsonl"].keys() and evals["tfds"]
  for key, value in evals["tfds"].items():
    if isinstance(value, float):
      assert value == pytest.approx(evals["jsonl"][key], abs=1e-4), key


def test_karpathy_json_all_captions_restval_to_train(tmp_path):
  path = gen.write_karpathy(str(tmp_path / "flickr"), 40, missing=(13,), bad_caption=(4,))
  data_dir = str(tmp_path / "tfds")
  out = builders.prepare("karpathy", input=path, data_dir=data_dir, name="flickr_kp",
                         image_size=24)
  # 40 images: every 10th val, 10th + 1 test, 10th + 2 restval (-> train), image 13 missing.
  assert out["splits"] == {"train": 31, "val": 4, "test": 4}
  assert out["skipped"] == {"missing_image": 1}
  beam = builders.prepare("karpathy", input=path, data_dir=data_dir, name="flickr_kp_beam",
                          image_size=24, beam=True, beam_options=_beam_options())
  assert beam["splits"] == out["splits"] and beam["skipped"] == out["skipped"]
  for split in ("train", "test"):
    assert ([r["content_hash"] for r in _read(data_dir, "flickr_kp", split)] ==
            [r["content_hash"] for r in _read(data_dir, "flickr_kp_beam", split)])
  # Read with no other setting: every caption a record, with its image's id (COCO protocol).
  config = micro_config(data_dir, data__name="tfds", data__tfds_name="flickr_kp")
  test = make_source(config.data, "test")
  assert len(test) == 4 * 5 and [test[i]["image_id"] for i in range(6)] == [0] * 5 + [1]
  assert sorted({test[i]["caption"].split(" caption")[0] for i in range(20)}) == [
      "image 1", "image 11", "image 21", "image 31"]
  train = make_source(config.data, "train")
  assert len(train) == 31 * 5 - 1   # image 4's blank caption left out, the image kept


def _cut_in_half(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])


def test_truncated_shard_keeps_what_came_before(tmp_path):
  samples = gen.make_samples(20, corrupt_fraction=0, num_duplicates=0)
  path, = gen.write_shards(str(tmp_path), samples, 1)
  _cut_in_half(path)
  items = list(webdataset.tar_samples(path))
  assert items[-1] == "corrupt_shard" and 5 <= len(items) - 1 < 20


def test_img2dataset_folders_and_parquet_give_what_the_tars_give(tmp_path):
  """The same samples (3% damaged, duplicates) as tar shards, img2dataset "files"
  folders and "parquet" files build the same records (content hash, caption, kept
  field) in the same order, with the same skips by reason."""
  samples = gen.make_samples(300, corrupt_fraction=0.03, num_duplicates=3)
  inputs = {"tar": gen.write_shards(str(tmp_path / "tar"), samples, 3)}
  os.makedirs(tmp_path / "files")
  os.makedirs(tmp_path / "parquet")
  inputs["files"] = gen.write_folders(str(tmp_path / "files"), samples, 3)
  inputs["parquet"] = gen.write_parquet(str(tmp_path / "parquet"), samples, 3)
  built = {}
  for kind, paths in inputs.items():
    out = builders.prepare("webdataset", input=",".join(paths), data_dir=str(tmp_path / "tfds"),
                           name=f"pairs_{kind}", **dict(ARGS, test_fraction=0))
    assert out["skipped"] == gen.expected_skips(samples), kind
    assert out["duplicates"] == 3, kind
    built[kind] = [(r["content_hash"], r["caption"], r["url"])
                   for r in _read(tmp_path / "tfds", f"pairs_{kind}", "train")]
  assert len(built["tar"]) == 300 - sum(gen.expected_skips(samples).values())
  assert built["files"] == built["tar"] and built["parquet"] == built["tar"]


def test_truncated_parquet_counts_one_corrupt_shard(tmp_path):
  samples = gen.make_samples(20, corrupt_fraction=0, num_duplicates=0)
  path, = gen.write_parquet(str(tmp_path), samples, 1)
  _cut_in_half(path)
  assert list(webdataset.shard_samples(path)) == ["corrupt_shard"]


def test_killed_build_is_not_read_as_complete_and_the_rerun_finishes(tmp_path):
  """SIGKILL while the build reads its last shard (a FIFO the test holds open): no set is
  listed or loadable, config validation sees no split; the same command then builds it."""
  from clusjax.config_tasks import _prepared_tfds_splits
  samples = gen.make_samples(80, corrupt_fraction=0.05, num_duplicates=2)
  folder = tmp_path / "shards"
  paths = gen.write_shards(str(folder), samples, 4)
  last = open(paths[-1], "rb").read()
  os.remove(paths[-1])
  os.mkfifo(paths[-1])
  data_dir = tmp_path / "tfds"
  command = [sys.executable, PREPARE, "webdataset", f"--input={folder}/*.tar",
             f"--output={data_dir}", "--name=killed", "--image_size=32"]
  proc = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while True:   # a writer can open the FIFO once the build reads it
      try:
        fd = os.open(paths[-1], os.O_WRONLY | os.O_NONBLOCK)
        break
      except OSError:
        assert proc.poll() is None and time.time() < deadline, "the build never read shard 3"
        time.sleep(0.05)
    os.write(fd, last[:4096])   # half way through the shard
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    os.close(fd)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert list((data_dir / "killed").glob("incomplete.*"))   # the leftover of the build
  assert _prepared_tfds_splits("killed", str(data_dir)) is None
  config = micro_config(data_dir, data__name="tfds", data__tfds_name="killed")
  with pytest.raises(FileNotFoundError, match="not prepared"):
    make_source(config.data, "train")
  os.remove(paths[-1])
  with open(paths[-1], "wb") as f:
    f.write(last)
  result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "removing" in result.stdout and "written:    train 76" in result.stdout
  assert not list((data_dir / "killed").glob("incomplete.*"))
  assert len(make_source(config.data, "train")) == 76
  assert _prepared_tfds_splits("killed", str(data_dir)) == {"train"}


@pytest.mark.parametrize("args, message", [
    (["webdataset", "--input=/nonexistent/*.tar"], "matches no file"),
    (["karpathy", "--input={shard}"], "malformed JSON"),
    (["webdataset", "--input={shard}", "--frobnicate=1"], "unknown flag --frobnicate"),
])
def test_bad_input_exits_2_in_one_line(tmp_path, args, message):
  samples = gen.make_samples(4, corrupt_fraction=0, num_duplicates=0)
  shard, = gen.write_shards(str(tmp_path), samples, 1)
  command = [sys.executable, PREPARE, *[a.format(shard=shard) for a in args],
             f"--output={tmp_path}/tfds", "--name=bad"]
  result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_a_rerun_with_other_arguments_is_refused(shards, built):
  data_dir, _ = built
  pattern, _ = shards
  with pytest.raises(builders.InputError, match="image_size=32, not 64"):
    builders.prepare("webdataset", input=pattern, data_dir=str(data_dir), name="pairs_local",
                     **dict(ARGS, image_size=64))
