"""Two-image statement sources (NLVR2-style)."""
import collections
import io
import json
import pickle
import re

import numpy as np
import PIL.Image
import pytest

from clusjax.data import nlvr, shapes_tfds
from clusjax.data.shapes import COLOURS, KINDS
from clusjax.data.sources import ShapesSource

N = 1000


@pytest.fixture(scope="module")
def shapes_src(tmp_path_factory):
  b = shapes_tfds.prepare_shapes(str(tmp_path_factory.mktemp("shapes")), image_size=32, num_train=64,
                            num_val=8, num_test=32, seed=0)
  return ShapesSource(b.as_data_source(split="train"))


@pytest.fixture(scope="module")
def shapes_nlvr(shapes_src):
  source = nlvr.ShapesNlvrSource(shapes_src, num_examples=N, seed=0)
  return source, [source[i] for i in range(N)]


def _content(record):
  """[(kind name, colour name)] of the shapes in a shapes record."""
  return [(KINDS[k], COLOURS[c]) for k, c, p in zip(record["kind"], record["colour"],
                                                     record["position"]) if p >= 0]


def _truth(statement, left, right):
  """(statement type, truth) of a statement about two images, from its text alone."""
  if m := re.fullmatch(r"the left image has (more|fewer) (\w+) shapes than the right one\.",
                       statement):
    a = sum(c == m[2] for _, c in left)
    b = sum(c == m[2] for _, c in right)
    return "more_colour", a > b if m[1] == "more" else a < b
  has_kind = lambda items, kind: kind in {k for k, _ in items}  # noqa: E731
  if m := re.fullmatch(r"both images contain an? (\w+)\.", statement):
    return "both_kind", has_kind(left, m[1]) and has_kind(right, m[1])
  if m := re.fullmatch(r"neither image contains an? (\w+) shape\.", statement):
    return "neither_kind", all(c != m[1] for _, c in left + right)
  if statement == "the two images have the same number of shapes.":
    return "same_count", len(left) == len(right)
  if m := re.fullmatch(r"exactly one of the images contains an? (\w+)\.", statement):
    return "only_one_kind", has_kind(left, m[1]) + has_kind(right, m[1]) == 1
  if statement == "the left image has more shapes than the right image.":
    return "more_shapes", len(left) > len(right)
  raise AssertionError(f"unrecognised statement {statement!r}")


def test_shapes_nlvr_labels_are_right(shapes_src, shapes_nlvr):
  _, records = shapes_nlvr
  for i, r in enumerate(records):
    left, right = shapes_src[r["image_index"]], shapes_src[r["image2_index"]]
    assert r["image_index"] == i % len(shapes_src) and r["image2_index"] != r["image_index"]
    assert r["image"] == left["image"] and r["image2"] == right["image"]
    stype, truth = _truth(r["caption"], _content(left), _content(right))
    assert (r["statement_type"], r["label"]) == (stype, int(truth)), r["caption"]


def test_shapes_nlvr_balanced(shapes_nlvr):
  _, records = shapes_nlvr
  labels = [r["label"] for r in records]
  assert 0.45 <= np.mean(labels) <= 0.55
  pairs = collections.Counter((r["statement_type"], r["label"]) for r in records)
  for stype in nlvr.STATEMENT_TYPES:
    for label in (0, 1):
      assert pairs[stype, label] >= 20, (stype, label, pairs)
  # Colours and kinds vary (not one word every time).
  words = {w for r in records for w in r["caption"].rstrip(".").split()}
  assert len(words & set(COLOURS)) >= 6 and len(words & set(KINDS)) == len(KINDS)


def test_shapes_nlvr_deterministic(shapes_src, shapes_nlvr):
  source, records = shapes_nlvr
  again = nlvr.ShapesNlvrSource(shapes_src, num_examples=N, seed=0)
  copied = pickle.loads(pickle.dumps(source))
  for i in (0, 1, 333, N - 1):
    assert again[i] == records[i] and copied[i] == records[i]
  assert source[-1] == records[-1]
  other = nlvr.ShapesNlvrSource(shapes_src, num_examples=200, seed=1)
  same = sum(other[i]["caption"] == records[i]["caption"]
             and other[i]["image2_index"] == records[i]["image2_index"] for i in range(200))
  assert same < 50
  assert len(nlvr.ShapesNlvrSource(shapes_src)) == len(shapes_src)
  with pytest.raises(IndexError):
    source[N]


def _png(path, colour):
  PIL.Image.new("RGB", (8, 8), colour).save(path)


def test_nlvr2_jsonl(tmp_path):
  _png(tmp_path / "l.png", (255, 0, 0))
  _png(tmp_path / "r.png", (0, 0, 255))
  labels = [True, "False", 1, 0, "true"]
  lines = [{"left": "l.png", "right": str(tmp_path / "r.png"), "sentence": f"s{i}", "label": v}
           for i, v in enumerate(labels)]
  lines[-1]["right"] = "missing.png"
  path = tmp_path / "nlvr2.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  source = nlvr.Nlvr2JsonlSource(path)
  assert [source[i]["label"] for i in range(len(source))] == [1, 0, 1, 0, 1]
  r = source[0]
  assert r["caption"] == "s0" and r["statement_type"] == ""
  left = np.asarray(PIL.Image.open(io.BytesIO(r["image"])))
  right = np.asarray(PIL.Image.open(io.BytesIO(r["image2"])))
  assert tuple(left[0, 0]) == (255, 0, 0) and tuple(right[0, 0]) == (0, 0, 255)
  assert source[4]["image"] is not None and source[4]["image2"] is None
  assert pickle.loads(pickle.dumps(source))[0] == r


@pytest.mark.parametrize("bad, message", [
    ("{not json", "malformed JSON"),
    ('{"left": "l.png", "right": "r.png", "label": true}', "missing key"),
    ('{"left": "l.png", "right": "r.png", "sentence": "s", "label": "maybe"}', "label"),
    ('{"left": "l.png", "right": "r.png", "sentence": "s", "label": 2}', "label"),
])
def test_nlvr2_jsonl_bad_line(tmp_path, bad, message):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"left": "l.png", "right": "r.png", "sentence": "s", "label": False})
  path.write_text(f"{good}\n\n{bad}\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
    nlvr.Nlvr2JsonlSource(path)
