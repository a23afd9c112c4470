"""Prepared image-text sets: WebDataset shards / Karpathy JSON -> TFDS ArrayRecord.

    summary = prepare("webdataset", input="/data/cc3m/{00000..00331}.tar",
                      data_dir="/data/tfds", name="cc3m", image_size=256)
    # then: --config.data.name=tfds --config.data.tfds_name=cc3m --config.data.data_dir=/data/tfds

The set lands in <data_dir>/<name>/1.0.0/ and is read like any prepared TFDS
set (clusjax.data.sources.TfdsSource). TFDS writes it inside an
`incomplete.*` folder and renames that when the build has finished, so a
build killed halfway is never read as complete: a rerun removes the leftover
folder and builds again. `launch/prepare_data.py` is the command line.
"""
import fcntl
import glob
import os
import re
import shutil
import time

import tensorflow_datasets as tfds
from tensorflow_datasets.core import read_only_builder

from clusjax.data.builders import karpathy, records, webdataset
from clusjax.data.builders.webdataset import InputError

KINDS = ("webdataset", "karpathy")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_BUILDERS = {("webdataset", False): webdataset.WebDatasetBuilder,
             ("webdataset", True): webdataset.BeamWebDatasetBuilder,
             ("karpathy", False): karpathy.KarpathyBuilder,
             ("karpathy", True): karpathy.BeamKarpathyBuilder}


def build_args(kind, *, input, image_size=256, max_image_bytes=records.DEFAULT_MAX_IMAGE_BYTES,
               image_keys=webdataset.DEFAULT_IMAGE_KEYS, caption_key="txt", json_key="json",
               keep_json=(), test_fraction=0.0, image_root=""):
  """What a set is built from, checked (InputError naming the bad value): the dict its
  metadata.json keeps as build_args, and a rerun must match."""
  if kind not in KINDS:
    raise InputError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
  if not isinstance(image_size, int) or image_size < 0:
    raise InputError(f"--image_size={image_size!r} must be a whole number >= 0 "
                     "(the shorter side in pixels; 0 keeps the size)")
  if not 0 <= test_fraction < 1:
    raise InputError(f"--test_fraction={test_fraction} must be in [0, 1)")
  args = {"kind": kind, "image_size": image_size, "max_image_bytes": int(max_image_bytes)}
  if kind == "webdataset":
    image_keys = [k.lower().lstrip(".") for k in image_keys if k]
    if not image_keys or not caption_key:
      raise InputError("--image_keys and --caption_key must name tar member extensions, "
                       "e.g. --image_keys=jpg,png --caption_key=txt")
    bad = [f for f in keep_json if not re.fullmatch(r"[A-Za-z_]\w*", f) or
           f in ("image", "caption", "key", "content_hash")]
    if bad:
      raise InputError(f"--keep_json field {bad[0]!r} cannot be a feature name; use JSON "
                       "keys other than image, caption, key, content_hash")
    args.update(shards=webdataset.expand_shards(input), image_keys=image_keys,
                caption_key=caption_key.lower().lstrip("."), json_key=json_key,
                keep_json=list(keep_json), test_fraction=float(test_fraction))
  else:
    path = os.path.abspath(os.path.expanduser(input))
    karpathy.read_karpathy(path)   # fails now, naming the file, not inside a worker
    root = os.path.abspath(os.path.expanduser(image_root or os.path.dirname(path)))
    if not os.path.isdir(root):
      raise InputError(f"--image_root={image_root}: no such folder")
    args.update(input=path, image_root=root)
  return args


def make_builder(name, data_dir, args, beam=False):
  """The builder of set `name` in `data_dir` from build_args(...)."""
  if not _NAME.fullmatch(name or ""):
    raise InputError(f"--name={name!r} is not a TFDS data set name; use lower case "
                     "letters, digits and _, starting with a letter (e.g. cc3m_256)")
  base_cls = _BUILDERS[(args["kind"], bool(beam))]
  # TFDS names a set after its builder class: one subclass per name.
  cls = type(f"Prepared_{name}", (base_cls,), {"name": name, "__module__": base_cls.__module__},
             skip_registration=True)
  builder = cls(build_args=args, data_dir=data_dir, file_format="array_record")
  return builder


def stale_builds(builder):
  """Leftovers of killed builds of this set: TFDS's incomplete.* folders."""
  return sorted(glob.glob(os.path.join(os.path.dirname(os.fspath(builder.data_path)),
                                       "incomplete.*")))


def _same_args(prepared, args):
  """None, or the first build argument that differs between a prepared set and a rerun."""
  for key in sorted(set(prepared) | set(args)):
    if prepared.get(key) != args.get(key):
      return key
  return None


def summary(data_dir, name):
  """{"path", "splits": {split: n}, "skipped": {reason: n}, "duplicates", "build_args"}
  of a prepared set, read from its files."""
  builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
  metadata = dict(builder.info.metadata or {})
  stats = metadata.get("stats", {})
  return {"path": os.fspath(builder.data_path),
          "splits": {s: builder.info.splits[s].num_examples for s in builder.info.splits},
          "skipped": {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("skipped/")},
          "duplicates": stats.get("duplicates", 0), "build_args": metadata.get("build_args", {})}


def prepare(kind, *, input, data_dir, name, beam=False, beam_options=None, beam_runner=None,
            log=print, **kwargs):
  """Builds set `name` unless it is already there (same build arguments); returns summary().

  beam: build with Apache Beam (beam_options: a PipelineOptions, e.g. DirectRunner
  with direct_num_workers, or Dataflow / Flink / Spark flags). kwargs: build_args'.
  A set already prepared from other arguments raises InputError (give another name).
  """
  args = build_args(kind, input=input, **kwargs)
  data_dir = os.path.abspath(os.path.expanduser(data_dir)) if "://" not in data_dir else data_dir
  builder = make_builder(name, data_dir, args, beam)
  if not builder.is_prepared():
    lock = None
    if "://" not in data_dir:   # one build at a time on a local disk; a bucket has no flock
      os.makedirs(os.path.dirname(os.fspath(builder.data_path)), exist_ok=True)
      lock = open(os.path.join(os.path.dirname(os.fspath(builder.data_path)), ".prepare.lock"),
                  "w")
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not builder.is_prepared():   # another process may have built it meanwhile
        for folder in stale_builds(builder):   # under the lock: no build is using them
          log(f"removing {folder}: a build that did not finish")
          shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        config = tfds.download.DownloadConfig(beam_options=beam_options, beam_runner=beam_runner)
        builder.download_and_prepare(download_config=config)
        log(f"built {name} in {time.perf_counter() - start:.1f} s")
    finally:
      if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
  out = summary(data_dir, name)
  differs = _same_args(out["build_args"], args)
  if differs:
    raise InputError(f"{out['path']} was prepared with {differs}="
                     f"{out['build_args'].get(differs)!r}, not {args.get(differs)!r}; "
                     "give another --name, or delete that folder to rebuild it")
  return out
