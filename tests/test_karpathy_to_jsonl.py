"""launch/karpathy_to_jsonl.py: Karpathy split JSON -> JSONL that JsonlSource groups by image."""
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image

from clusjax.data.sources import JsonlSource
from clusjax.eval.retrieval import recall_at_k
from tests.conftest import ROOT, subprocess_env

SCRIPT = os.path.join(ROOT, "launch", "karpathy_to_jsonl.py")
# 6 images: the 2 missing files are one train and one test image.
SPLITS = ["train", "restval", "val", "test", "test", "train"]
MISSING = {3, 5}


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120)


def _karpathy(tmp_path):
  """A tiny dataset_coco.json (5 captions per image) and its PNGs under image_root."""
  root = tmp_path / "coco"
  images = []
  for i, split in enumerate(SPLITS):
    folder = "val2014" if i % 2 else "train2014"
    if i not in MISSING:
      (root / folder).mkdir(parents=True, exist_ok=True)
      PIL.Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / folder / f"{i}.png")
    images.append({"filepath": folder, "filename": f"{i}.png", "split": split,
                   "sentences": [{"raw": f" image {i} caption {j}. "} for j in range(5)]})
  path = tmp_path / "dataset_coco.json"
  path.write_text(json.dumps({"images": images, "dataset": "coco"}))
  return path, root


def _lines(path):
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_converts_and_groups_captions(tmp_path):
  path, root = _karpathy(tmp_path)
  out = tmp_path / "jsonl"
  result = _run(f"--karpathy_json={path}", f"--image_root={root}", f"--output_dir={out}")
  assert result.returncode == 0, result.stderr
  assert "2 image files are missing" in result.stderr and "left out" in result.stderr
  assert "train (train+restval): 2 images, 10 captions, 1 missing files" in result.stdout
  assert "test  (test): 1 images, 5 captions, 1 missing files" in result.stdout
  assert sorted(os.listdir(out)) == ["test.jsonl", "train.jsonl", "val.jsonl"]  # no tmp left

  train = _lines(out / "train.jsonl")
  assert [l["image"] for l in train] == [str(root / "train2014" / "0.png"),
                                         str(root / "val2014" / "1.png")]
  assert train[0]["captions"] == [f"image 0 caption {j}." for j in range(5)]
  assert [os.path.basename(l["image"]) for l in _lines(out / "val.jsonl")] == ["2.png"]

  # --noskip_missing keeps the missing images (the pipeline counts them as bad).
  result = _run(f"--karpathy_json={path}", f"--image_root={root}", f"--output_dir={out}",
                "--noskip_missing")
  assert result.returncode == 0, result.stderr
  assert "kept" in result.stderr
  test = _lines(out / "test.jsonl")
  assert [os.path.basename(l["image"]) for l in test] == ["3.png", "4.png"]

  source = JsonlSource(out / "test.jsonl")
  assert len(source) == 10 and source.num_images == 2
  records = [source[i] for i in range(len(source))]
  ids = np.array([r["image_id"] for r in records])
  np.testing.assert_array_equal(ids, np.repeat([0, 1], 5))
  assert records[0]["image"] is None and records[5]["image"][:4] == b"\x89PNG"
  assert records[7]["caption"] == "image 4 caption 2."

  # The ids drive the COCO protocol: each image scores its own captions highest.
  sim = np.where(ids[None, :] == np.arange(2)[:, None], 1.0, 0.0)
  recalls = recall_at_k(sim, text_image=ids)
  assert recalls["i2t_r1"] == 1.0 and recalls["t2i_r1"] == 1.0


def test_malformed_json_fails_naming_file(tmp_path):
  path = tmp_path / "dataset_coco.json"
  path.write_text('{"images": [')
  result = _run(f"--karpathy_json={path}", f"--image_root={tmp_path}",
                f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  assert f"--karpathy_json={path}: malformed JSON" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "out").exists()


def test_missing_key_and_file_fail_naming_them(tmp_path):
  path = tmp_path / "dataset_flickr30k.json"
  path.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
  result = _run(f"--karpathy_json={path}", f"--image_root={tmp_path}",
                f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2
  assert f'{path}: images[0] has no "sentences" key' in result.stderr

  path.write_text(json.dumps({"annotations": []}))
  result = _run(f"--karpathy_json={path}", f"--image_root={tmp_path}",
                f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2 and 'no "images" list' in result.stderr

  result = _run(f"--karpathy_json={tmp_path / 'nope.json'}", f"--image_root={tmp_path}",
                f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 2 and "nope.json: cannot read it" in result.stderr
