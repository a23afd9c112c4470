"""VQA sources and the answer vocabulary."""
import collections
import io
import json
import pickle
import re

import numpy as np
import PIL.Image
import pytest

from clusjax.data import shapes_tfds, vqa
from clusjax.data.shapes import COLOURS, KINDS, POSITION_PHRASES, POSITIONS, SIZES
from clusjax.data.sources import ShapesSource

NUMBERS = {1: "one", 2: "two", 3: "three"}


@pytest.fixture(scope="module")
def shapes_src(tmp_path_factory):
  b = shapes_tfds.prepare_shapes(str(tmp_path_factory.mktemp("shapes")), image_size=32, num_train=64,
                            num_val=8, num_test=32, seed=0)
  return ShapesSource(b.as_data_source(split="train"))


@pytest.fixture(scope="module")
def shapes_vqa(shapes_src):
  source = vqa.ShapesVqaSource(shapes_src, questions_per_image=8, seed=0)
  return source, [source[i] for i in range(len(source))]


def _shapes_of(record):
  """[(kind name, colour name, size name, position name)] of a shapes record."""
  return [(KINDS[k], COLOURS[c], SIZES[s], POSITIONS[p])
          for k, c, s, p in zip(record["kind"], record["colour"], record["size"],
                                record["position"]) if p >= 0]


def _answer(question, items):
  """(question_type, the one right answer) derived from the question text alone."""
  phrase = dict(zip(POSITIONS, POSITION_PHRASES))  # "left" -> "on the left"
  by_phrase = {phrase[pos]: (k, c, s) for k, c, s, pos in items}
  if m := re.fullmatch(r"what colour is the shape (.+)\?", question):
    return "colour", by_phrase[m[1]][1]
  if m := re.fullmatch(r"what shape is (.+)\?", question):
    return "kind", by_phrase[m[1]][0]
  if m := re.fullmatch(r"what size is the shape (.+)\?", question):
    return "size", by_phrase[m[1]][2]
  if question == "how many shapes are there?":
    return "count", NUMBERS[len(items)]
  if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
    assert m[1] in COLOURS and m[2] in KINDS
    return "exists", "yes" if any((c, k) == (m[1], m[2]) for k, c, _, _ in items) else "no"
  if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
    matches = [pos for k, c, _, pos in items if (c, k) == (m[1], m[2])]
    assert len(matches) == 1, (question, items)  # the question must name one shape
    return "position", matches[0]
  raise AssertionError(f"unrecognised question {question!r}")


def test_shapes_vqa_answers_are_right(shapes_src, shapes_vqa):
  source, records = shapes_vqa
  assert len(source) == 8 * len(shapes_src)
  for i, r in enumerate(records):
    image = shapes_src[i // 8]
    assert r["image"] == image["image"]
    assert set(r) == {"image", "caption", "answers", "question_type"}
    qtype, answer = _answer(r["caption"], _shapes_of(image))
    assert (r["question_type"], r["answers"]) == (qtype, [answer]), r["caption"]


def test_shapes_vqa_covers_types_and_balances_exists(shapes_vqa):
  _, records = shapes_vqa
  types = collections.Counter(r["question_type"] for r in records)
  assert set(types) == set(vqa.SHAPES_QUESTION_TYPES)
  assert min(types.values()) >= 40  # 512 questions, 6 types
  exists = [r["answers"][0] == "yes" for r in records if r["question_type"] == "exists"]
  assert 0.35 <= np.mean(exists) <= 0.65
  counts = {r["answers"][0] for r in records if r["question_type"] == "count"}
  assert counts == {"one", "two", "three"}


def test_shapes_vqa_deterministic(shapes_src, shapes_vqa):
  source, records = shapes_vqa
  again = vqa.ShapesVqaSource(shapes_src, questions_per_image=8, seed=0)
  copied = pickle.loads(pickle.dumps(source))
  for i in (0, 17, len(source) - 1):
    assert again[i] == records[i] and copied[i] == records[i]
  assert source[-1] == records[-1]
  other = vqa.ShapesVqaSource(shapes_src, questions_per_image=8, seed=1)
  same = sum(other[i]["caption"] == records[i]["caption"] for i in range(len(source)))
  assert same < len(source) // 2
  with pytest.raises(IndexError):
    source[len(source)]


def test_shapes_vqa_all_answers(shapes_vqa):
  source, records = shapes_vqa
  assert source.all_answers() == [r["answers"] for r in records]


def test_answer_scores():
  assert vqa.answer_scores(["a", "a", "b"]) == pytest.approx({"a": 2 / 3, "b": 1 / 3})
  assert vqa.answer_scores(["x"]) == {"x": 1.0}
  ten = ["yes"] * 4 + ["no"] * 2 + ["maybe"] * 3 + ["Maybe "]
  assert vqa.answer_scores(ten) == pytest.approx({"yes": 1.0, "no": 2 / 3, "maybe": 1.0})


def test_answer_vocab():
  lists = [["b", "b", "a"], ["a", "c"], ["d"], ["c", "b"], ["e"]]
  # counts: b 3, a 2, c 2, d 1, e 1 -> ties alphabetical.
  vocab = vqa.AnswerVocab.from_answers(lists, 4)
  assert vocab.answers == ("b", "a", "c", "d") and len(vocab) == 4
  assert vocab.index("c") == 2 and vocab.index("C ") == 2 and vocab.index("e") == -1
  assert vqa.AnswerVocab.from_json(json.loads(json.dumps(vocab.to_json()))).answers == vocab.answers
  assert len(vqa.AnswerVocab.from_answers(lists, 100)) == 5

  scores, label = vocab.targets(["a", "a", "b", "e"])
  np.testing.assert_allclose(scores, [1 / 3, 2 / 3, 0, 0])
  assert scores.dtype == np.float32 and label.dtype == np.int32 and label == 1
  # A tie goes to the more frequent answer (earlier in the vocabulary).
  assert vocab.targets(["c", "a"])[1] == 1
  scores, label = vocab.targets(["e"])
  assert not scores.any() and label == -1
  with pytest.raises(ValueError, match="num_answers=0"):
    vqa.AnswerVocab.from_answers(lists, 0)


def _png(path, colour=(255, 0, 0)):
  PIL.Image.new("RGB", (8, 8), colour).save(path)


def test_vqa_jsonl(tmp_path):
  _png(tmp_path / "a.png")
  lines = [{"image": "a.png", "question": "what colour?", "answers": ["red", "red", "pink"]},
           {"image": str(tmp_path / "a.png"), "question": "is it red?", "answer": "yes",
            "question_type": "yes/no"},
           {"image": "missing.png", "question": "q?", "answer": "no"}]
  path = tmp_path / "vqa.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  source = vqa.VqaJsonlSource(path)
  assert len(source) == 3
  r = source[0]
  assert PIL.Image.open(io.BytesIO(r["image"])).size == (8, 8)
  assert (r["caption"], r["answers"], r["question_type"]) == ("what colour?",
                                                             ["red", "red", "pink"], "")
  assert source[1]["answers"] == ["yes"] and source[1]["question_type"] == "yes/no"
  assert source[1]["image"] == r["image"]
  assert source[2]["image"] is None
  assert source.all_answers() == [["red", "red", "pink"], ["yes"], ["no"]]
  assert pickle.loads(pickle.dumps(source))[0] == r


@pytest.mark.parametrize("bad, message", [
    ("{not json", "malformed JSON"),
    ('{"image": "a.png", "answers": ["x"]}', "missing key"),
    ('{"image": "a.png", "question": "q?"}', "answers"),
    ('{"image": "a.png", "question": "q?", "answers": []}', "non-empty list"),
    ("[1, 2]", "JSON object"),
])
def test_vqa_jsonl_bad_line(tmp_path, bad, message):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"image": "a.png", "question": "q?", "answer": "x"})
  path.write_text(f"{good}\n{bad}\n")
  with pytest.raises(ValueError, match=rf"bad\.jsonl:2: .*{message}"):
    vqa.VqaJsonlSource(path)


def test_easy_vqa():
  pytest.importorskip("easy_vqa")  # pinned in requirements.txt
  train, test = vqa.EasyVqaSource("train"), vqa.EasyVqaSource("test")
  assert (len(train), len(test)) == (38_575, 9_673)
  r = train[0]
  assert (r["caption"], r["answers"]) == ("what is the blue shape?", ["rectangle"])
  assert r["question_type"] == "shape"
  image = np.asarray(PIL.Image.open(io.BytesIO(r["image"])).convert("RGB"))
  assert image.shape == (64, 64, 3)
  types = {train[i]["question_type"]: train[i]["answers"][0] for i in range(300)}
  assert set(types) == {"yes/no", "shape", "colour"}
  assert types["yes/no"] in ("yes", "no") and types["colour"] in (
      "black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
  assert test.all_answers()[:500] == [test[i]["answers"] for i in range(500)]
  vocab = vqa.AnswerVocab.from_answers(train.all_answers(), 100)
  assert len(vocab) == 13 and vocab.answers[:2] == ("yes", "no")


def test_easy_vqa_errors(monkeypatch):
  with pytest.raises(ValueError, match=r"'val'.*\('train', 'test'\)"):
    vqa.EasyVqaSource("val")
  monkeypatch.setattr(vqa.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ImportError, match=r"pip install easy-vqa==1\.0"):
    vqa.EasyVqaSource("train")
