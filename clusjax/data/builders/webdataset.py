"""WebDataset tar shards and img2dataset's other outputs -> a prepared TFDS set.

A shard is one of img2dataset's three output formats:
- a tar (`output_format="webdataset"`) of samples, each a run of members
  sharing a key: `key.jpg`, `key.txt`, `key.json` (the key is the member path
  up to the first dot of its file name, as webdataset splits it);
- a folder (`output_format="files"`) holding the same members as files;
- a parquet file (`output_format="parquet"`), one sample per row: the image
  in the column named by an image key (`jpg`, ...), the caption in column
  `caption` (or the one named by `caption_key`), the other scalar columns
  as the JSON member's fields (`key`, `url`, `width`, ...).
Shards are named by a glob, a brace list (`shards/{00000..00099}.tar`) or
several of those separated by commas; they are read in sorted order, as
local or mounted paths.

Every sample becomes one record of split "train", or of "test" when its
content hash falls in the held-out fraction (`test_fraction`; see
records.in_holdout). Skips: a sample without an image member is
missing_image, without a caption member empty_caption, with a malformed JSON
member (when fields are kept) malformed_json; a shard that breaks off
(truncated, not a tar or parquet file) counts one corrupt_shard and keeps
what came before.
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
          [pattern] if os.path.exists(pattern) else [])
      if not found:
        raise InputError(f"--input={spec}: {pattern!r} matches no file")
      paths.extend(os.path.abspath(p) for p in found)
  if not paths:
    raise InputError(f"--input={spec!r} names no shard; give a glob or brace list, "
                     "e.g. /data/shards/{00000..00099}.tar")
  return sorted(set(paths))


def _grouped(members, errors):
  """(member path, read()) in order -> (sample key, {extension: bytes}) per run of
  members sharing a key, then "corrupt_shard" if reading raises one of `errors`
  (the samples read before it are kept, the one being read too). Members without
  an extension, or hidden, are left out."""
  key, sample = None, {}
  try:
    for path, read in members:
      folder, name = os.path.split(path)
      stem, dot, ext = name.partition(".")
      if not dot or stem.startswith("."):
        continue   # no extension, or hidden (e.g. macOS ._ files)
      if os.path.join(folder, stem) != key and sample:
        yield key, sample
        sample = {}
      key = os.path.join(folder, stem)
      sample[ext.lower()] = read()
  except errors:
    if sample:
      yield key, sample
    yield "corrupt_shard"
    return
  if sample:
    yield key, sample


def _tar_members(path):
  with tarfile.open(path, mode="r|*") as tar:   # streaming: one pass, any compression
    for info in tar:
      if info.isfile():
        yield info.name, tar.extractfile(info).read


def tar_samples(path):
  """Yields (sample key, {extension: bytes}) per sample of a tar shard, then the
  string "corrupt_shard" if the shard breaks off before its end."""
  return _grouped(_tar_members(path), (tarfile.TarError, EOFError, OSError, ValueError))


def folder_samples(path):
  """As tar_samples, for a folder of member files (img2dataset's "files" output)."""
  def read(name):
    with open(os.path.join(path, name), "rb") as f:
      return f.read()
  names = sorted(os.path.relpath(os.path.join(d, f), path)
                 for d, _, files in os.walk(path) for f in files)
  return _grouped(((name, lambda name=name: read(name)) for name in names), OSError)


def parquet_samples(path, caption_key="txt", json_key="json"):
  """As tar_samples, for a parquet file (img2dataset's "parquet" output): each row one
  sample; bytes columns are members (the image's), the caption column (`caption_key`
  if the file has it, else img2dataset's `caption`) the `caption_key` member, and the
  other non-null scalar columns the `json_key` member's fields."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top (only for parquet input)
  n = 0
  try:
    parquet = pq.ParquetFile(path)
    column = caption_key if caption_key in parquet.schema_arrow.names else "caption"
    for batch in parquet.iter_batches(batch_size=256):
      for row in batch.to_pylist():
        members, fields = {}, {}
        for name, value in row.items():
          if value is None:
            continue
          if name == column:
            members[caption_key] = value if isinstance(value, bytes) else str(value).encode()
          elif isinstance(value, bytes):
            members[name.lower()] = value
          elif isinstance(value, (str, int, float, bool)):
            fields[name] = value
        members[json_key] = json.dumps(fields).encode()
        key = row.get("key")
        yield str(n if key is None else key), members
        n += 1
  except Exception:  # noqa: BLE001 - pyarrow raises many types for a damaged file
    yield "corrupt_shard"


def shard_samples(path, caption_key="txt", json_key="json"):
  """The samples of one shard, by its kind: folder, parquet file or tar."""
  if os.path.isdir(path):
    return folder_samples(path)
  if path.endswith(".parquet"):
    return parquet_samples(path, caption_key, json_key)
  return tar_samples(path)


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
  for n, sample in enumerate(shard_samples(path, caption_key, args["json_key"])):
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
