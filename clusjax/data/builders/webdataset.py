"""WebDataset tar shards (img2dataset's output) -> a prepared TFDS set.

A shard is a tar of samples, each a run of members sharing a key: `key.jpg`,
`key.txt`, `key.json` (the key is the member path up to the first dot of its
file name, as webdataset splits it). Shards are named by a glob, a brace list
(`shards/{00000..00099}.tar`) or several of those separated by commas; they
are read in sorted order, as local or mounted files.

Every sample becomes one record of split "train", or of "test" when its
content hash falls in the held-out fraction (`test_fraction`; see
records.in_holdout). Skips: a sample without an image member is
missing_image, without a caption member empty_caption, with a malformed JSON
member (when fields are kept) malformed_json; a shard that breaks off
(truncated, not a tar) counts one corrupt_shard and keeps what came before.
"""
import glob
import json
import os
import tarfile

import braceexpand

from clusjax.data.builders import base, records

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class InputError(ValueError):
  """Input that names nothing to build from (no shard matched, no JSON file)."""


def expand_shards(spec):
  """"a/{000..002}.tar,b/*.tar" -> sorted, de-duplicated absolute paths; InputError
  naming the pattern that matched nothing."""
  paths = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    for pattern in braceexpand.braceexpand(os.path.expanduser(part)):
      found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else (
          [pattern] if os.path.isfile(pattern) else [])
      if not found:
        raise InputError(f"--input={spec}: {pattern!r} matches no file")
      paths.extend(os.path.abspath(p) for p in found)
  if not paths:
    raise InputError(f"--input={spec!r} names no shard; give a glob or brace list, "
                     "e.g. /data/shards/{00000..00099}.tar")
  return sorted(set(paths))


def tar_samples(path):
  """Yields (sample key, {extension: bytes}) per sample of a tar shard, then the
  string "corrupt_shard" if the shard breaks off before its end."""
  key, members = None, {}
  try:
    with tarfile.open(path, mode="r|*") as tar:   # streaming: one pass, any compression
      for info in tar:
        if not info.isfile():
          continue
        folder, name = os.path.split(info.name)
        stem, dot, ext = name.partition(".")
        if not dot or stem.startswith("."):
          continue   # no extension, or hidden (e.g. macOS ._ files)
        sample = os.path.join(folder, stem)
        data = tar.extractfile(info).read()
        if sample != key and members:
          yield key, members
          members = {}
        key = sample
        members[ext.lower()] = data
  except (tarfile.TarError, EOFError, OSError, ValueError):
    if members:
      yield key, members
    yield "corrupt_shard"
    return
  if members:
    yield key, members


def _json_fields(raw, fields):
  """The kept fields of a sample's JSON member as text ("" where absent), or None."""
  try:
    meta = json.loads(raw) if raw is not None else {}
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  if not isinstance(meta, dict):
    return None
  return {f: v if isinstance(v, str) else ("" if v is None else json.dumps(v))
          for f, v in ((f, meta.get(f)) for f in fields)}


def shard_items(unit, args):
  """(key, record) per usable sample of one shard, or the reason it is skipped."""
  shard_index, path = unit
  image_keys, caption_key = args["image_keys"], args["caption_key"]
  for n, sample in enumerate(tar_samples(path)):
    if isinstance(sample, str):
      yield sample
      continue
    name, members = sample
    image = next((members[k] for k in image_keys if k in members), None)
    if caption_key not in members:
      yield "empty_caption" if image is not None else "missing_image"
      continue
    extra = {}
    if args["keep_json"]:
      extra = _json_fields(members.get(args["json_key"]), args["keep_json"])
      if extra is None:
        yield "malformed_json"
        continue
    caption = records.text_of(members[caption_key])
    cleaned, reason = records.clean(image, [caption], image_size=args["image_size"],
                                    max_image_bytes=args["max_image_bytes"])
    if reason:
      yield reason
      continue
    stored, captions, digest = cleaned
    yield f"{shard_index:06d}/{n:09d}", {
        "image": stored, "caption": captions[0], "content_hash": digest,
        "key": f"{os.path.basename(path)}/{name}", **extra}


class WebDatasetBuilder(base.PairBuilder, skip_registration=True):
  """Image-caption pairs from WebDataset tar shards (module docstring)."""
  DESCRIPTION = "Image-caption pairs prepared from WebDataset tar shards."

  def _work(self):
    return {"train": [list(u) for u in enumerate(self.build_args["shards"])]}

  def _outputs(self, split):
    return ["train", "test"] if self.build_args.get("test_fraction") else ["train"]

  @staticmethod
  def output_of(split, record, build_args):
    del split
    return "test" if records.in_holdout(record["content_hash"],
                                        build_args.get("test_fraction", 0)) else "train"

  _items = staticmethod(shard_items)


class BeamWebDatasetBuilder(base.BeamPairBuilder, WebDatasetBuilder, skip_registration=True):
  """WebDatasetBuilder on Apache Beam."""
