"""Captioning records (config.task caption): the built-in shapes with a
novel-object split, and any caption source grouped by image for evaluation.

Built-in shapes. Every shape is named in reading order (top, left, center,
right, bottom), so the order of a caption follows from the image. The
training captions of an image are `shapes.caption_variants` templates 0 ..
captions_per_image - 1 (template 0, "a small red circle on the left and ...",
alone with one per image); its references are all NUM_TEMPLATES variants.

Novel objects (NoCaps' spirit): the (colour, kind) pairs of
`config.data.novel_objects`, e.g. "red circle", never appear in the train
split's images here (an image holding one is left out), though pre-training
saw them. The eval split keeps every image; a record says whether it holds a
novel pair ("novel"), so the evaluator reports in-domain and novel apart.
"""
import numpy as np

from clusjax.data import shapes

# Reading order of shapes.POSITIONS (left, right, top, bottom, center).
_READING_RANK = (1, 3, 0, 4, 2)


def parse_novel_objects(objects, key="config.data.novel_objects"):
  """("colour kind", ...) -> set of (colour index, kind index); ValueError naming `key`."""
  pairs = set()
  for i, o in enumerate(objects):
    words = str(o).lower().split()
    if len(words) != 2 or words[0] not in shapes.COLOURS or words[1] not in shapes.KINDS:
      raise ValueError(f'{key}[{i}]={o!r} must be "colour kind" with a colour of '
                       f"{shapes.COLOURS} and a kind of {shapes.KINDS}.")
    pairs.add((shapes.COLOURS.index(words[0]), shapes.KINDS.index(words[1])))
  return pairs


def canonical_order(kind, colour, size, position):
  """The attribute arrays (int [MAX_SHAPES], -1 where absent) with the shapes in
  reading order, absent ones last."""
  kind, colour, size, position = (np.asarray(a) for a in (kind, colour, size, position))
  rank = [(_READING_RANK[p] if k >= 0 else 99) for k, p in zip(kind, position)]
  order = np.argsort(rank, kind="stable")
  return kind[order], colour[order], size[order], position[order]


def objects_of(kind, colour):
  """[(colour word, kind word)] of the shapes present."""
  return [(shapes.COLOURS[c], shapes.KINDS[k]) for k, c in zip(kind, colour) if k >= 0]


class ShapesCaptionSource:
  """Captioning records of one captioned-shapes split (`records`: its TFDS data source).

  Record i is caption i % n (n = captions_per_image) of kept image i // n:
  {"image", "caption", "image_id" (index among the kept images), "novel" bool,
  "references" [NUM_TEMPLATES str]}. With `drop_novel` (the train split) images
  holding a pair of `novel_objects` are left out.
  """

  def __init__(self, records, *, captions_per_image=1, novel_objects=(), drop_novel=False):
    self._records = records
    self.captions_per_image = captions_per_image
    shapes.caption_variants([0], [0], [0], [0], 0, captions_per_image)   # checks n
    novel = parse_novel_objects(novel_objects)
    self._attrs, self._novel, self._keep = [], [], []
    getitems = getattr(records, "__getitems__", None)
    for start in range(0, len(records), 512):
      keys = list(range(start, min(start + 512, len(records))))
      for i, r in zip(keys, getitems(keys) if getitems else [records[i] for i in keys]):
        attrs = canonical_order(*(np.asarray(r[k], np.int64)
                                  for k in ("kind", "colour", "size", "position")))
        is_novel = any((c, k) in novel for k, c in zip(attrs[0], attrs[1]) if k >= 0)
        if drop_novel and is_novel:
          continue
        self._keep.append(i)
        self._attrs.append(attrs)
        self._novel.append(is_novel)

  @property
  def num_images(self):
    return len(self._keep)

  def __len__(self):
    return len(self._keep) * self.captions_per_image

  def references(self, image_id):
    """All NUM_TEMPLATES captions of kept image `image_id` (template 0 first)."""
    return shapes.caption_variants(*self._attrs[image_id], 0, shapes.NUM_TEMPLATES)

  def info(self, image_id):
    """{"references", "novel", "objects": [(colour, kind)]} of kept image `image_id`."""
    kind, colour = self._attrs[image_id][:2]
    return {"references": self.references(image_id), "novel": self._novel[image_id],
            "objects": objects_of(kind, colour)}

  def __getitem__(self, index):
    image_id, j = divmod(index, self.captions_per_image)
    r = self._records[self._keep[image_id]]
    captions = shapes.caption_variants(*self._attrs[image_id], 0, self.captions_per_image)
    return {"image": r["image"], "caption": captions[j], "image_id": image_id,
            "novel": self._novel[image_id]}

  def by_image(self):
    """The same images, one record each (captions_per_image 1), for evaluation."""
    view = object.__new__(ShapesCaptionSource)
    view.__dict__.update(self.__dict__, captions_per_image=1)
    return view


class ImageCaptions:
  """Any caption source grouped by image (for evaluation): record i is the first
  record of image i (by "image_id", or one image per record without it), and
  `info(i)` holds all of that image's captions as references."""

  def __init__(self, source):
    self._source = source
    self._first, self._refs = [], []
    ids = {}
    for i in range(len(source)):
      r = source[i]
      key = r.get("image_id", i)
      if key not in ids:
        ids[key] = len(self._first)
        self._first.append(i)
        self._refs.append([])
      self._refs[ids[key]].append(r["caption"])

  @property
  def num_images(self):
    return len(self._first)

  def __len__(self):
    return len(self._first)

  def info(self, image_id):
    return {"references": self._refs[image_id], "novel": False, "objects": None}

  def __getitem__(self, index):
    return {**self._source[self._first[index]], "image_id": index}


def eval_images(source):
  """One record per image with `info(image_id)`: the source's own view or a grouping."""
  return source.by_image() if hasattr(source, "by_image") else ImageCaptions(source)
