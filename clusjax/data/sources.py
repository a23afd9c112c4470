"""Random-access record sources (Grain-compatible: `__len__`, `__getitem__`).

A record is a dict `{"image": <PNG/JPEG bytes, uint8 [H, W, 3] array, or
None when unreadable>, "caption": str, ...extra keys}`. Sources only read;
decoding, resizing and tokenizing happen in the pipeline, which also turns
unreadable records into counted skips (so a source never has to crash a run).
"""
import json
import os

import numpy as np
from tensorflow_datasets.core import read_only_builder

from clusjax.data import shapes

NAMES = ("shapes", "tfds", "jsonl")
# Split aliases, so eval_split="validation" also works for the built-in set.
_SHAPES_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def _text(value):
  """bytes / str / numpy scalar -> str."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ShapesSource:
  """The captioned-shapes TFDS split as records.

  Extra keys (for evaluators): num_shapes int; kind, colour, size, position
  int32 [3] (indices into shapes.KINDS etc., -1 where absent).
  """

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    r = self._source[index]
    out = {"image": r["image"], "caption": _text(r["caption"]),
           "num_shapes": int(r["num_shapes"])}
    for key in ("kind", "colour", "size", "position"):
      out[key] = np.asarray(r[key], np.int32)
    return out


def _lookup(record, path):
  """record["a"]["b"] for path "a/b"; lists (e.g. several captions) give their first."""
  value = record
  for part in path.split("/"):
    if isinstance(value, (list, tuple, np.ndarray)):
      value = value[0]
    value = value[part]
  if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
    value = value[0] if len(value) else ""
  return value


class TfdsSource:
  """A prepared TFDS (ArrayRecord) split as records {"image", "caption"}."""

  def __init__(self, data_source, image_key="image", caption_key="caption"):
    self._source = data_source
    self._image_key, self._caption_key = image_key, caption_key

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    r = self._source[index]
    return {"image": _lookup(r, self._image_key),
            "caption": _text(_lookup(r, self._caption_key))}


class JsonlSource:
  """Records from a JSONL file of `{"image": <path>, "caption": <str>}` lines.

  Image paths are relative to the JSONL's folder (or absolute). The file is
  parsed at construction (a malformed line or a missing key raises ValueError
  naming file and line); image bytes are read lazily in `__getitem__`, where
  a missing file gives image=None (a bad record the pipeline skips).
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"JSONL file {self.path!r} does not exist")
    folder = os.path.dirname(os.path.abspath(self.path))
    self._items = []  # [(image path, caption)]
    with open(self.path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, start=1):
        if not line.strip():
          continue
        where = f"{self.path}:{line_no}"
        try:
          entry = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{where}: malformed JSON ({e.msg}): {line.strip()[:80]!r}") from None
        if not isinstance(entry, dict):
          raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        missing = [k for k in ("image", "caption") if k not in entry]
        if missing:
          raise ValueError(f"{where}: missing key(s) {missing}; each line needs "
                           '{"image": <path>, "caption": <text>}')
        image = os.path.join(folder, os.path.expanduser(str(entry["image"])))
        self._items.append((image, str(entry["caption"])))

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    image_path, caption = self._items[index]
    try:
      with open(image_path, "rb") as f:
        image = f.read()
    except OSError:
      image = None  # counted as a bad record by the pipeline, with the path
    return {"image": image, "caption": caption, "image_path": image_path}


def _open_tfds(name, split, data_dir):
  """A TFDS ArrayRecord data source read from files only (no dataset code, no TF)."""
  where = data_dir or "the TFDS default data dir (~/tensorflow_datasets)"
  try:
    # From files, not tfds.builder(): many dataset modules (coco_captions)
    # import TensorFlow just to be constructed.
    builder = read_only_builder.builder_from_files(name, data_dir=data_dir or None)
  except Exception as e:  # DatasetNotFoundError and friends
    first_line = str(e).strip().split("\n")[0]
    raise FileNotFoundError(
        f"TFDS data set config.data.tfds_name={name!r} is not prepared in {where} "
        f"({first_line})\n"
        f"Prepare it once with: tfds build {name.split('/')[0]} --file_format=array_record"
        + (f" --data_dir={data_dir}" if data_dir else "")) from None
  try:
    return builder.as_data_source(split=split)
  except ValueError as e:
    raise ValueError(f"TFDS data set {name!r} in {where} has no usable split {split!r}: {e} "
                     "(random access needs file_format=array_record)") from None


def make_source(data_config, split):
  """The records of `split` for `config.data` (see module docstring).

  Args:
    data_config: config.data (name, data_dir, image_size, seed, shapes_num_*,
      tfds_name, image_key, caption_key, jsonl.{train,val,test}).
    split: split name, e.g. config.data.train_split / eval_split.
  Returns:
    A random-access source of record dicts.
  """
  name = data_config.name
  if name == "shapes":
    if split not in _SHAPES_SPLITS:
      raise ValueError(f"split {split!r} is not a captioned-shapes split; "
                       f"use one of {sorted(_SHAPES_SPLITS)}")
    builder = shapes.prepare_shapes(
        data_config.data_dir, image_size=data_config.image_size,
        num_train=data_config.shapes_num_train, num_val=data_config.shapes_num_val,
        num_test=data_config.shapes_num_test, seed=data_config.seed)
    return ShapesSource(builder.as_data_source(split=_SHAPES_SPLITS[split]))
  if name == "tfds":
    if not data_config.tfds_name:
      raise ValueError('config.data.name="tfds" needs config.data.tfds_name (e.g. "coco_captions")')
    return TfdsSource(_open_tfds(data_config.tfds_name, split, data_config.data_dir),
                      data_config.image_key, data_config.caption_key)
  if name == "jsonl":
    key = "val" if split == "validation" else split
    path = data_config.jsonl.get(key, "") if key in ("train", "val", "test") else ""
    if not path:
      raise ValueError(f"config.data.jsonl.{key} is not set: give a JSONL path for split "
                       f"{split!r} (splits: train, val, test)")
    return JsonlSource(path)
  raise ValueError(f"config.data.name={name!r} is unknown; use one of {NAMES}")
