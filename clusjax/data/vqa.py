"""Visual question answering: sources of question records and the answer vocabulary.

A VQA record is `{"image": <PNG/JPEG bytes, uint8 [H, W, 3] or None>,
"caption": <the question>, "answers": list[str], "question_type": str}`:
the question rides in "caption" so the pipeline tokenizes it like any text.
Every VQA source also has `all_answers()` (each record's answers, no image
read) so a vocabulary is built from a training split in seconds.

Sources: `ShapesVqaSource` (questions generated from the captioned-shapes
attributes, each with exactly one right answer), `EasyVqaSource` (the
easy-VQA set shipped inside the `easy-vqa` wheel) and `VqaJsonlSource`.
"""
import collections
import importlib.util
import json
import os

import numpy as np

from clusjax.data import shapes
from clusjax.data.damage import JsonlLines
from clusjax.data.sources import read_image_bytes

# ---------------------------------------------------------------------------
# Answers: soft scores and the vocabulary.


def normalize_answer(answer):
  """Lower-cased, stripped answer string (the form scores and vocabularies use)."""
  return str(answer).strip().lower()


def answer_scores(answers):
  """VQA v2 soft score of each distinct answer: {answer: min(count / 3, 1)}.

  Three annotators agreeing make an answer fully right. A list of one answer
  (easy-VQA, single-answer JSONL) gives it 1.0: one label is all there is.
  """
  answers = [normalize_answer(a) for a in answers]
  if len(answers) == 1:
    return {answers[0]: 1.0}
  return {a: min(c / 3.0, 1.0) for a, c in collections.Counter(answers).items()}


class AnswerVocab:
  """The answers a VQA head classifies over, most frequent first."""

  def __init__(self, answers):
    self.answers = tuple(normalize_answer(a) for a in answers)
    self._index = {a: i for i, a in enumerate(self.answers)}
    if len(self._index) != len(self.answers):
      dups = sorted(a for a, c in collections.Counter(self.answers).items() if c > 1)
      raise ValueError(f"AnswerVocab answers repeat {dups[:5]}: each answer must appear once")
    if not self.answers:
      raise ValueError("AnswerVocab needs at least one answer")

  @classmethod
  def from_answers(cls, answer_lists, num_answers):
    """The `num_answers` most frequent answers over all annotator answers.

    Ties are broken alphabetically so the vocabulary is deterministic. Fewer
    distinct answers than `num_answers` give a smaller vocabulary.
    """
    if int(num_answers) < 1:
      raise ValueError(f"num_answers={num_answers} must be >= 1")
    counts = collections.Counter(normalize_answer(a) for answers in answer_lists
                                 for a in answers)
    if not counts:
      raise ValueError("AnswerVocab.from_answers got no answers: is the source empty?")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return cls(a for a, _ in ranked[:int(num_answers)])

  def to_json(self):
    """The answers as a JSON-safe list (store it beside the checkpoint)."""
    return list(self.answers)

  @classmethod
  def from_json(cls, data):
    """Inverse of `to_json`: a list of answers (or its JSON text)."""
    if isinstance(data, (str, bytes)):
      data = json.loads(data)
    if not isinstance(data, (list, tuple)):
      raise ValueError(f"AnswerVocab.from_json expects a list of answers, got "
                       f"{type(data).__name__}")
    return cls(data)

  def __len__(self):
    return len(self.answers)

  def index(self, answer):
    """Index of `answer` in the vocabulary, or -1 when out of vocabulary."""
    return self._index.get(normalize_answer(answer), -1)

  def targets(self, answers):
    """Soft targets of one question's annotator answers.

    Returns:
      (scores float32 [A], label int32): scores from `answer_scores` at each
      in-vocabulary answer; label = the highest-scoring in-vocabulary answer
      (ties: the more frequent, i.e. earlier, one), -1 when none is in it.
    """
    scores = np.zeros((len(self.answers),), np.float32)
    for answer, score in answer_scores(answers).items():
      i = self._index.get(answer, -1)
      if i >= 0:
        scores[i] = score
    # argmax returns the first maximum, i.e. the more frequent answer on ties.
    label = int(np.argmax(scores)) if scores.any() else -1
    return scores, np.int32(label)


# ---------------------------------------------------------------------------
# Shared helpers (also used by nlvr.py).


def article(word):
  """'a red' / 'an orange': the indefinite article before `word`."""
  return ("an " if word[:1] in "aeiou" else "a ") + word


def _check_index(index, length):
  index = int(index)
  if index < 0:
    index += length
  if not 0 <= index < length:
    raise IndexError(f"index {index} out of range for a source of {length} records")
  return index


# ---------------------------------------------------------------------------
# Questions about captioned shapes.

SHAPES_QUESTION_TYPES = ("colour", "kind", "size", "count", "exists", "position")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five")


def _shapes_in(record):
  """[(kind, colour, size, position)] of the shapes present in a shapes record."""
  return [(int(k), int(c), int(s), int(p))
          for k, c, s, p in zip(record["kind"], record["colour"], record["size"],
                                record["position"]) if p >= 0]


def shapes_question(record, rng):
  """One question about a shapes record with exactly one right answer.

  Args:
    record: a captioned-shapes record (kind/colour/size/position int32 [3], -1 absent).
    rng: np.random.Generator; the draw is a pure function of its state.
  Returns:
    (question str, answer str, question_type str).
  """
  items = _shapes_in(record)
  if not items:
    raise ValueError("shapes record has no shapes (all positions are -1)")
  present = {(c, k) for k, c, _, _ in items}
  # A shape is named by colour + kind only if no other shape shares both.
  unique = [it for it in items if sum((o[1], o[0]) == (it[1], it[0]) for o in items) == 1]
  types = [t for t in SHAPES_QUESTION_TYPES if t != "position" or unique]
  qtype = types[int(rng.integers(len(types)))]

  if qtype in ("colour", "kind", "size"):
    kind, colour, size, pos = items[int(rng.integers(len(items)))]
    where = shapes.POSITION_PHRASES[pos]
    if qtype == "colour":
      return f"what colour is the shape {where}?", shapes.COLOURS[colour], qtype
    if qtype == "kind":
      return f"what shape is {where}?", shapes.KINDS[kind], qtype
    return f"what size is the shape {where}?", shapes.SIZES[size], qtype
  if qtype == "count":
    return "how many shapes are there?", COUNT_WORDS[len(items)], qtype
  if qtype == "exists":
    # Half present, half absent, so "yes" and "no" are equally likely.
    if rng.integers(2):
      kind, colour, _, _ = items[int(rng.integers(len(items)))]
      answer = "yes"
    else:
      absent = [(c, k) for c in range(len(shapes.COLOURS)) for k in range(len(shapes.KINDS))
                if (c, k) not in present]
      colour, kind = absent[int(rng.integers(len(absent)))]
      answer = "no"
    return f"is there {article(shapes.COLOURS[colour])} {shapes.KINDS[kind]}?", answer, qtype
  kind, colour, _, pos = unique[int(rng.integers(len(unique)))]
  return (f"where is the {shapes.COLOURS[colour]} {shapes.KINDS[kind]}?",
          shapes.POSITIONS[pos], qtype)


class ShapesVqaSource:
  """Generated questions about a captioned-shapes source.

  Record i asks question i % q about image i // q (q = questions_per_image),
  drawn from `np.random.default_rng([seed, i // q, i % q])`, so a record
  depends only on (seed, i) and the wrapped image.
  """

  def __init__(self, shapes_source, questions_per_image=4, seed=0):
    if int(questions_per_image) < 1:
      raise ValueError(f"questions_per_image={questions_per_image} must be >= 1")
    self._source = shapes_source
    self.questions_per_image = int(questions_per_image)
    self.seed = int(seed)

  def __len__(self):
    return self.questions_per_image * len(self._source)

  def _question(self, record, image, j):
    return shapes_question(record, np.random.default_rng([self.seed, image, j]))

  def __getitem__(self, index):
    index = _check_index(index, len(self))
    image, j = divmod(index, self.questions_per_image)
    record = self._source[image]
    question, answer, qtype = self._question(record, image, j)
    return {"image": record["image"], "caption": question, "answers": [answer],
            "question_type": qtype}

  def all_answers(self):
    """Each record's answers, in order; reads each wrapped record once (no image decode)."""
    out = []
    for image in range(len(self._source)):
      record = self._source[image]  # PNG bytes come along but are never decoded
      out.extend([self._question(record, image, j)[1]]
                 for j in range(self.questions_per_image))
    return out


# ---------------------------------------------------------------------------
# easy-VQA (https://github.com/vzhou842/easy-VQA), read from the installed wheel.

EASY_VQA_SPLITS = ("train", "test")
EASY_VQA_SHAPES = ("circle", "rectangle", "triangle")


def _easy_vqa_dir():
  spec = importlib.util.find_spec("easy_vqa")  # locates, does not import
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("easy-vqa is not installed: pip install easy-vqa==1.0")
  return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _easy_vqa_type(answer):
  if answer in ("yes", "no"):
    return "yes/no"
  return "shape" if answer in EASY_VQA_SHAPES else "colour"


class EasyVqaSource:
  """easy-VQA: 64x64 RGB images of one shape; 38,575 train / 9,673 test questions.

  Reads the data files inside the installed `easy_vqa` package (never
  downloads). question_type is "yes/no", "shape" or "colour" by the answer.
  """

  def __init__(self, split):
    if split not in EASY_VQA_SPLITS:
      raise ValueError(f"easy-VQA split {split!r} does not exist; use one of "
                       f"{EASY_VQA_SPLITS} (it has no validation split)")
    self.split = split
    folder = os.path.join(_easy_vqa_dir(), split)
    path = os.path.join(folder, "questions.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: reinstall with "
                              "pip install --force-reinstall easy-vqa==1.0")
    with open(path, encoding="utf-8") as f:
      triples = json.load(f)  # [[question, answer, image_id], ...]
    self._images = os.path.join(folder, "images")
    self._items = [(str(q), str(a), int(i)) for q, a, i in triples]

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    question, answer, image_id = self._items[index]
    path = os.path.join(self._images, f"{image_id}.png")
    return {"image": read_image_bytes(path), "caption": question, "answers": [answer],
            "question_type": _easy_vqa_type(answer), "image_path": path}

  def all_answers(self):
    return [[a] for _, a, _ in self._items]


# ---------------------------------------------------------------------------
# JSONL.


class VqaJsonlSource:
  """Records from JSONL lines `{"image": <path>, "question": <str>, "answers": [<str>, ...]}`.

  A single `"answer": <str>` may stand for "answers"; "question_type" is
  optional ("" when absent). Image paths are relative to the JSONL's folder
  (or absolute). The file is parsed at construction, damaged lines skipped
  and counted in `skipped` as JsonlSource's; images are read lazily, a
  missing one gives image=None.
  """

  _HINT = '{"image": <path>, "question": <text>, "answers": [<text>, ...]}'

  def __init__(self, path):
    self.path = os.fspath(path)
    self._items = []  # [(image path, question, answers, question_type)]
    lines = JsonlLines(self.path, ("image", "question"), self._HINT)
    for where, entry in lines:
      try:
        self._parse(lines, where, entry)
      except ValueError as e:   # counted; too many raise (clusjax.data.damage)
        lines.skip("bad_fields", where, str(e))
    self.skipped = lines.done(len(self._items))

  def _parse(self, lines, where, entry):
    if "answers" in entry:
      answers = entry["answers"]
      if (not isinstance(answers, list) or not answers
          or not all(isinstance(a, str) for a in answers)):
        raise ValueError(f"{where}: \"answers\" must be a non-empty list of strings, "
                         f"got {answers!r}")
    elif "answer" in entry:
      if not isinstance(entry["answer"], str):
        raise ValueError(f"{where}: \"answer\" must be a string, got {entry['answer']!r}")
      answers = [entry["answer"]]
    else:
      raise ValueError(f"{where}: missing key \"answers\" (or \"answer\"); each line "
                       f"needs {self._HINT}")
    self._items.append((lines.image_path(entry, "image", where),
                        lines.text(entry["question"], "question", where), list(answers),
                        str(entry.get("question_type", ""))))

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    image_path, question, answers, qtype = self._items[index]
    return {"image": read_image_bytes(image_path), "caption": question,
            "answers": list(answers), "question_type": qtype, "image_path": image_path}

  def all_answers(self):
    return [list(answers) for _, _, answers, _ in self._items]
