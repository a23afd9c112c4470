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

from clusjax.data import shapes, shapes_tfds
from clusjax.data.damage import JsonlLines

NAMES = ("shapes", "tfds", "jsonl", "easy_vqa")
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
  int32 [3] (indices into shapes.KINDS etc., -1 where absent). With
  `captions_per_image` n > 1, record i is caption i % n of image i // n
  (`shapes.caption_variants`: differently worded, each true of the image) and
  carries "image_id" (= i // n), so retrieval follows the COCO protocol.
  """

  def __init__(self, data_source, captions_per_image=1):
    self._source = data_source
    self.captions_per_image = captions_per_image
    if captions_per_image > 1:   # checks the count once, not per record
      shapes.caption_variants([0], [0], [0], [0], 0, captions_per_image)

  def __len__(self):
    return len(self._source) * self.captions_per_image

  def __getitem__(self, index):
    n = self.captions_per_image
    image_index, j = divmod(index, n)
    r = self._source[image_index]
    out = {"image": r["image"], "caption": _text(r["caption"]),
           "num_shapes": int(r["num_shapes"])}
    for key in ("kind", "colour", "size", "position"):
      out[key] = np.asarray(r[key], np.int32)
    # The caption's background word (sets made before v2 have none: black).
    out["background"] = _text(r["background"]) if "background" in r else "black"
    if n > 1:
      out["caption"] = shapes.caption_variants(
          out["kind"], out["colour"], out["size"], out["position"], image_index, n,
          out["background"])[j]
      out["image_id"] = image_index
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


def _lookup_all(record, path):
  """Every value at path "a/b" of record, in order: [value, ...]. Lists are
  flattened at each level ({"a": {"b": [x, y]}} and {"a": [{"b": x}, {"b": y}]}
  both give [x, y])."""
  def items(v):
    return list(v) if isinstance(v, (list, tuple)) or (
        isinstance(v, np.ndarray) and v.ndim) else [v]
  values = [record]
  for part in path.split("/"):
    values = [item[part] for v in values for item in items(v)]
  return [item for v in values for item in items(v)]


class TfdsSource:
  """A prepared TFDS (ArrayRecord) split as records {"image", "caption"}.

  With `all_captions`, every caption of an image (coco_captions:
  caption_key="captions/text", 5 or more per image) is its own record, with
  "image_id" = the TFDS record index, so retrieval follows the COCO protocol;
  an image without captions gives no record. The record -> (TFDS index,
  caption j) index is built at construction by reading every record once
  (images are decoded too: minutes for COCO train). Without it, record i is
  TFDS record i with its first caption.
  """

  def __init__(self, data_source, image_key="image", caption_key="caption", all_captions=False):
    self._source = data_source
    self._image_key, self._caption_key = image_key, caption_key
    self.all_captions = all_captions
    self._index = None   # int64 [N_captions, 2]: (TFDS index, caption j)
    if all_captions:
      counts = np.array([len(self._captions(r, i)) for i, r in _read_all(data_source)], np.int64)
      image = np.repeat(np.arange(len(counts)), counts)
      first = np.cumsum(counts) - counts   # each image's first record
      self._index = np.stack([image, np.arange(len(image)) - first[image]], axis=1)

  def _captions(self, record, tfds_index):
    try:
      return _lookup_all(record, self._caption_key)
    except (KeyError, IndexError, TypeError):
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      # ValueError, not KeyError: KeyError would print the message as a quoted repr.
      raise ValueError(f"caption_key={self._caption_key!r} is not in TFDS record {tfds_index} "
                       f"(top-level keys {keys}); set config.data.caption_key, e.g. "
                       '"captions/text" for coco_captions') from None

  def __len__(self):
    return len(self._source) if self._index is None else len(self._index)

  def __getitem__(self, index):
    if self._index is None:
      r = self._source[index]
      return {"image": _lookup(r, self._image_key),
              "caption": _text(_lookup(r, self._caption_key))}
    tfds_index, j = (int(v) for v in self._index[index])
    r = self._source[tfds_index]
    return {"image": _lookup(r, self._image_key),
            "caption": _text(self._captions(r, tfds_index)[j]), "image_id": tfds_index}


def _read_all(data_source, chunk=256):
  """Yields (index, record) for every record; batched reads where the source has
  `__getitems__` (TFDS ArrayRecord: parallel reads, much faster than one by one)."""
  getitems = getattr(data_source, "__getitems__", None)
  for start in range(0, len(data_source), chunk):
    keys = range(start, min(start + chunk, len(data_source)))
    records = getitems(list(keys)) if getitems else [data_source[i] for i in keys]
    yield from zip(keys, records)


class JsonlSource:
  """Records from a JSONL file of `{"image": <path>, "caption": <str>}` lines,
  or `{"image": <path>, "captions": [<str>, ...]}` (one record per caption, in
  order; launch/karpathy_to_jsonl.py writes COCO / Flickr30k this way).

  Record keys: image (bytes, or None when unreadable), caption, image_path,
  image_id int: the index of the image path in order of first appearance, so
  lines naming the same file (wherever they are) share it and retrieval
  follows the COCO / Flickr protocol; with one line per image it is the line's
  record index, the paired protocol.

  Image paths are relative to the JSONL's folder (or absolute). The file is
  parsed at construction, where malformed lines are skipped and counted in
  `skipped` (reason -> count, `clusjax.data.damage`; a file mostly malformed
  or with no usable line raises DataError naming file:line); image bytes are
  read lazily in `__getitem__` (a missing file gives image=None), and the
  pipeline's decode skips and counts damaged images and captions.
  """

  def __init__(self, path):
    self.path = os.fspath(path)
    self._paths = []     # [image path], by image id
    self._items = []     # [(image id, caption)], by record
    ids = {}             # normalised image path -> image id
    lines = JsonlLines(self.path)
    for where, entry in lines:
      try:
        captions = _jsonl_captions(entry, where)
        image = lines.image_path(entry, "image", where)
      except ValueError as e:
        lines.skip("bad_fields", where, str(e))
        continue
      # Normalised so "img/0.png" and "/abs/set/img/0.png" are one image.
      key = os.path.normpath(image)
      if key not in ids:
        ids[key] = len(self._paths)
        self._paths.append(image)
      self._items.extend((ids[key], c) for c in captions)
    self.skipped = lines.done(len(self._items))

  @property
  def num_images(self):
    """Distinct image paths (image ids are 0..num_images - 1)."""
    return len(self._paths)

  def __len__(self):
    return len(self._items)

  def __getitem__(self, index):
    image_id, caption = self._items[index]
    image_path = self._paths[image_id]
    # A missing file: image None, counted as a bad record by the pipeline, with the path.
    return {"image": read_image_bytes(image_path), "caption": caption, "image_path": image_path,
            "image_id": image_id}


def read_image_bytes(path):
  """The file's bytes, or None when it cannot be read (a bad record the pipeline skips)."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None


def jsonl_entries(path, required, hint):
  """Yields (where "file:line", dict) for each usable line of a JSONL file
  (`damage.JsonlLines`, whose `skip` / `caption_ok` / `done` this form lacks:
  sources use JsonlLines itself so their skips are counted)."""
  return iter(JsonlLines(path, required, hint))


def _jsonl_captions(entry, where):
  """The captions of one JSONL line (a dict): [str], from "caption" or "captions"."""
  usage = ('each line needs {"image": <path>, "caption": <text>} or '
           '{"image": <path>, "captions": [<text>, ...]}')
  has = [k for k in ("caption", "captions") if k in entry]
  missing = [k for k in ("image",) if k not in entry] + ([] if has else ["caption"])
  if missing:
    raise ValueError(f"{where}: missing key(s) {missing}; {usage}")
  if len(has) == 2:
    raise ValueError(f'{where}: has both "caption" and "captions"; keep one ({usage})')
  if has == ["caption"]:
    return [JsonlLines.text(entry["caption"], "caption", where)]
  captions = entry["captions"]
  if not isinstance(captions, list) or not captions:
    raise ValueError(f'{where}: "captions" must be a non-empty list of strings, got '
                     f"{json.dumps(captions)[:80]}; drop the line or give it a caption")
  bad = [j for j, c in enumerate(captions) if not isinstance(c, str)]
  if bad:
    raise ValueError(f'{where}: "captions"[{bad[0]}] is {json.dumps(captions[bad[0]])[:80]}, '
                     "not a string")
  return [JsonlLines.text(c, "captions", where) for c in captions]


def _open_tfds(name, split, data_dir):
  """(A TFDS ArrayRecord data source read from files only (no dataset code, no TF),
  whether its metadata asks for all captions: sets launch/prepare_data.py made from a
  Karpathy JSON hold every caption of an image, read under the multi-caption protocol)."""
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
    metadata = builder.info.metadata or {}
    return builder.as_data_source(split=split), bool(metadata.get("all_captions", False))
  except ValueError as e:
    raise ValueError(f"TFDS data set {name!r} in {where} has no usable split {split!r}: {e} "
                     "(random access needs file_format=array_record)") from None


def _jsonl_path(data_config, split):
  key = "val" if split == "validation" else split
  path = data_config.jsonl.get(key, "") if key in ("train", "val", "test") else ""
  if not path:
    raise ValueError(f"config.data.jsonl.{key} is not set: give a JSONL path for split "
                     f"{split!r} (splits: train, val, test)")
  return path


def make_source(data_config, split, task="pretrain"):
  """The records of `split` for `config.data` and `config.task` (see module docstring).

  Args:
    data_config: config.data (name, data_dir, image_size, seed, shapes_num_*,
      captions_per_image, questions_per_image, tfds_name, image_key, caption_key,
      jsonl.{train,val,test}).
    split: split name, e.g. config.data.train_split / eval_split.
    task: config.task. pretrain / retrieval read image-caption records; vqa
      reads questions ({"image", "caption": question, "answers", "question_type"},
      clusjax/data/vqa.py), nlvr2 statements about two images ({"image",
      "image2", "caption": statement, "label", "statement_type"}, clusjax/data/nlvr.py).
  Returns:
    A random-access source of record dicts.
  """
  name = data_config.name
  if name == "shapes":
    if split not in _SHAPES_SPLITS:
      raise ValueError(f"split {split!r} is not a captioned-shapes split; "
                       f"use one of {sorted(_SHAPES_SPLITS)}")
    builder = shapes_tfds.prepare_shapes(
        data_config.data_dir, image_size=data_config.image_size,
        num_train=data_config.shapes_num_train, num_val=data_config.shapes_num_val,
        num_test=data_config.shapes_num_test, seed=data_config.seed,
        # A workdir's config from before v2 has no shapes_version: it was trained on v1.
        version=data_config.get("shapes_version", 1),
        backgrounds=tuple(data_config.get("shapes_backgrounds", shapes.DEFAULT_BACKGROUNDS)))
    records = builder.as_data_source(split=_SHAPES_SPLITS[split])
    if task == "vqa":
      from clusjax.data.vqa import ShapesVqaSource
      return ShapesVqaSource(ShapesSource(records), data_config.questions_per_image,
                             seed=data_config.seed)
    if task == "nlvr2":
      from clusjax.data.nlvr import ShapesNlvrSource
      return ShapesNlvrSource(ShapesSource(records), seed=data_config.seed)
    if task == "caption":   # canonical captions, novel objects out of train (data/captions.py)
      from clusjax.data.captions import ShapesCaptionSource
      return ShapesCaptionSource(records, captions_per_image=data_config.captions_per_image,
                                 novel_objects=data_config.get("novel_objects", ()),
                                 drop_novel=_SHAPES_SPLITS[split] == "train")
    return ShapesSource(records, data_config.get("captions_per_image", 1))
  if name == "easy_vqa":
    from clusjax.data.vqa import EasyVqaSource
    return EasyVqaSource(split)
  if name == "tfds":
    if not data_config.tfds_name:
      raise ValueError('config.data.name="tfds" needs config.data.tfds_name (e.g. "coco_captions")')
    records, all_captions = _open_tfds(data_config.tfds_name, split, data_config.data_dir)
    return TfdsSource(records, data_config.image_key, data_config.caption_key,
                      all_captions=data_config.get("all_captions", False) or all_captions)
  if name == "jsonl":
    path = _jsonl_path(data_config, split)
    if task == "vqa":
      from clusjax.data.vqa import VqaJsonlSource
      return VqaJsonlSource(path)
    if task == "nlvr2":
      from clusjax.data.nlvr import Nlvr2JsonlSource
      return Nlvr2JsonlSource(path)
    return JsonlSource(path)
  raise ValueError(f"config.data.name={name!r} is unknown; use one of {NAMES}")
