"""A Karpathy split JSON (COCO / Flickr30K) and its image folder -> a prepared TFDS set.

Reads dataset_coco.json / dataset_flickr30k.json ({"images": [{"filepath"
(COCO only), "filename", "split", "sentences": [{"raw"}, ...]}, ...]}); each
image becomes one record holding all its captions (a Sequence of Text), in
split train (Karpathy "train" + "restval", as ALBEF and BLIP train), val or
test. The set's metadata says all_captions, so clusjax reads every caption as
a record with the image's id: retrieval follows the COCO / Flickr protocol.

Skips: an entry that is not an object or lacks a key is bad_fields; a missing
image file missing_image; captions and image bytes as records.clean. Damaged
captions of an image are left out while one good caption is left.
"""
import json
import os

from clusjax.data.builders import base, records
from clusjax.data.builders.webdataset import InputError
from clusjax.data.sources import read_image_bytes

# Output split -> the Karpathy splits it holds.
SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}
_TO_OUTPUT = {k: name for name, ks in SPLITS.items() for k in ks}


def read_karpathy(path):
  """The "images" list of a Karpathy JSON; InputError naming the file and problem."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise InputError(f"--input={path}: cannot read it ({e.strerror})") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise InputError(f"--input={path}: malformed JSON ({e}); expected a Karpathy split "
                     "(dataset_coco.json / dataset_flickr30k.json)") from None
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise InputError(f'--input={path}: no "images" list at the top level; expected '
                     '{"images": [{"filename", "split", "sentences"}, ...]}')
  return data["images"]


def work_units(images, image_root):
  """{split: [[index, image path or None, [caption], ...]]}; None: a bad entry."""
  out = {name: [] for name in SPLITS}
  for i, entry in enumerate(images):
    try:
      split = _TO_OUTPUT[entry["split"]]
      captions = [records.text_of(s["raw"]) for s in entry["sentences"]]
      relative = os.path.join(entry.get("filepath", ""), entry["filename"])
    except (TypeError, KeyError, AttributeError):
      # Unknown split, key missing, wrong type: counted in "train" (no split to name).
      out["train"].append([i, None, [], ""])
      continue
    out[split].append([i, os.path.join(image_root, relative), captions, relative])
  return out


def image_items(unit, args):
  """One Karpathy image's (key, record), or the reason it is skipped."""
  index, path, captions, relative = unit
  if path is None:
    yield "bad_fields"
    return
  cleaned, reason = records.clean(read_image_bytes(path), captions,
                                  image_size=args["image_size"],
                                  max_image_bytes=args["max_image_bytes"],
                                  drop_bad_captions=True)
  if reason:
    yield reason
    return
  stored, kept, digest = cleaned
  yield f"{index:09d}", {"image": stored, "caption": kept, "content_hash": digest,
                         "key": relative}


class KarpathyBuilder(base.PairBuilder, skip_registration=True):
  """COCO / Flickr30K Karpathy splits, every caption of an image in its record."""
  DESCRIPTION = "Image-captions records prepared from a Karpathy split JSON."
  MULTI_CAPTION = True

  def _work(self):
    units = work_units(read_karpathy(self.build_args["input"]), self.build_args["image_root"])
    return {name: units[name] for name in SPLITS if units[name]}

  _items = staticmethod(image_items)


class BeamKarpathyBuilder(base.BeamPairBuilder, KarpathyBuilder, skip_registration=True):
  """KarpathyBuilder on Apache Beam."""
