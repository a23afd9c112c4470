"""Several captions per image: JsonlSource "captions" lines and TfdsSource(all_captions)."""
import json

import numpy as np
import pytest

from clusjax.data.sources import JsonlSource, TfdsSource


def _write(tmp_path, lines):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(l) if isinstance(l, dict) else l for l in lines) + "\n")
  return path


def test_jsonl_captions_grouped_by_image(tmp_path):
  (tmp_path / "a.png").write_bytes(b"A")
  path = _write(tmp_path, [
      {"image": "a.png", "captions": ["a one", "a two"]},
      {"image": "b.png", "caption": "b one"},
      "",
      {"image": str(tmp_path / "a.png"), "caption": "a three"},   # same file, absolute
      {"image": "./b.png", "captions": ["b two"]},
      {"image": "c.png", "caption": "c one"},
  ])
  source = JsonlSource(path)
  assert len(source) == 6 and source.num_images == 3
  records = [source[i] for i in range(len(source))]
  assert [r["caption"] for r in records] == ["a one", "a two", "b one", "a three", "b two",
                                             "c one"]
  assert [r["image_id"] for r in records] == [0, 0, 1, 0, 1, 2]
  assert records[0]["image"] == b"A" and records[3]["image"] == b"A"
  assert records[2]["image"] is None   # missing file: a bad record for the pipeline
  assert records[0]["image_path"] == str(tmp_path / "a.png")


def test_jsonl_single_caption_format_unchanged(tmp_path):
  path = _write(tmp_path, [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(3)])
  source = JsonlSource(path)
  assert [source[i]["caption"] for i in range(3)] == ["c0", "c1", "c2"]
  assert [source[i]["image_id"] for i in range(3)] == [0, 1, 2]   # paired protocol
  assert set(source[0]) == {"image", "caption", "image_path", "image_id"}


@pytest.mark.parametrize("line, message", [
    ({"image": "a.png", "caption": "x", "captions": ["y"]}, r'has both "caption" and "captions"'),
    ({"image": "a.png"}, r"missing key.*caption"),
    ({"caption": "x"}, r"missing key.*image"),
    ({"image": "a.png", "captions": []}, r'"captions" must be a non-empty list'),
    ({"image": "a.png", "captions": "x"}, r'"captions" must be a non-empty list'),
    ({"image": "a.png", "captions": ["x", 3]}, r'"captions"\[1\] is 3'),
])
def test_jsonl_bad_caption_lines_name_file_and_line(tmp_path, line, message):
  good = {"image": "a.png", "captions": ["x"]}
  with pytest.raises(ValueError, match=r"data.jsonl:2: " + message):
    JsonlSource(_write(tmp_path, [good, line, good]))


def _fake_coco(captions_per_image):
  """TFDS coco_captions-like records: captions/text is a list of bytes."""
  return [{"image": np.full((2, 2, 3), i, np.uint8),
           "captions": {"text": np.array([f"img {i} cap {j}".encode() for j in range(n)],
                                         dtype=object),
                        "id": np.arange(n)}}
          for i, n in enumerate(captions_per_image)]


class _BatchedSource:
  """A list with TFDS ArrayRecord's batched `__getitems__`; counts the reads."""

  def __init__(self, records):
    self.records, self.reads = records, 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads += 1
    return self.records[i]

  def __getitems__(self, keys):
    self.reads += len(keys)
    return [self.records[i] for i in keys]


def test_tfds_first_caption_by_default():
  source = TfdsSource(_fake_coco([2, 3]), caption_key="captions/text")
  assert len(source) == 2
  assert source[1]["caption"] == "img 1 cap 0" and "image_id" not in source[1]
  assert source[1]["image"][0, 0, 0] == 1


def test_tfds_all_captions():
  counts = [5, 0, 6, 1]   # an image with no caption gives no record
  data = _BatchedSource(_fake_coco(counts))
  source = TfdsSource(data, caption_key="captions/text", all_captions=True)
  assert data.reads == len(counts)   # the index reads every record once
  assert len(source) == sum(counts)
  records = [source[i] for i in range(len(source))]
  expected = [(i, f"img {i} cap {j}") for i, n in enumerate(counts) for j in range(n)]
  assert [(r["image_id"], r["caption"]) for r in records] == expected
  assert all(r["image"][0, 0, 0] == r["image_id"] for r in records)
  # A plain list (no __getitems__), captions as a Python list of bytes.
  plain = [{"image": b"png", "captions": {"text": [b"x", b"y"]}}]
  source = TfdsSource(plain, caption_key="captions/text", all_captions=True)
  assert [source[i] for i in range(2)] == [{"image": b"png", "caption": c, "image_id": 0}
                                           for c in ("x", "y")]


def test_tfds_all_captions_bad_key_names_it():
  with pytest.raises(ValueError, match=r"caption_key='caption' is not in TFDS record 0"):
    TfdsSource(_fake_coco([1]), all_captions=True)
