"""The captioned shapes as a TFDS data set: `CaptionedShapes` stores the examples of
`clusjax.data.shapes.make_example` as ArrayRecord (no TensorFlow needed), one builder
per data version; `prepare_shapes` builds a set once per data dir."""
import concurrent.futures
import dataclasses
import fcntl
import multiprocessing
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from clusjax.data import shapes_v2
from clusjax.data.shapes import (LATEST_VERSION, MAX_SHAPES, VERSIONS, check_args, encode_png,
                                 make_example)


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """One generated variant; its name encodes every field (see `config_name`)."""
  image_size: int = 64
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  seed: int = 0
  backgrounds: tuple = shapes_v2.DEFAULT_BACKGROUNDS   # v2 only


def config_name(image_size, num_train, num_val, num_test, seed,
                backgrounds=shapes_v2.DEFAULT_BACKGROUNDS):
  name = f"s{image_size}_tr{num_train}_va{num_val}_te{num_test}_seed{seed}"
  if tuple(backgrounds) != shapes_v2.DEFAULT_BACKGROUNDS:
    name += "_bg" + "-".join(backgrounds)
  return name


def tfds_version(version):
  """Data version (VERSIONS) -> the TFDS version string of its data sets."""
  return {1: "1.1.0", 2: "2.0.0", 3: "3.0.0"}[version]


class CaptionedShapes(tfds.core.GeneratorBasedBuilder):
  """Captioned shapes as ArrayRecord; records in generation order (index i = example i).

  Features: image = PNG bytes (a string Tensor: features.Image would need
  TensorFlow to encode), caption Text (decodes to bytes), num_shapes int32,
  kind/colour/size/position int32 [MAX_SHAPES]; from 2.0.0 background Text
  (the caption's word for it). Version 1.1.0 and 2.0.0 sets are CaptionedShapesV1's
  and CaptionedShapesV2's.
  """
  VERSION = tfds.core.Version("3.0.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Shapes centred in their cells (JITTER = 0).",
                   "2.0.0": "Renderer v2 (shapes_v2.py): continuous sizes and places, rotation, "
                            "anti-aliasing, colour jitter, varied backgrounds.",
                   "3.0.0": "v2's images; val and test scenes never repeat within their split."}
  BUILDER_CONFIGS = []  # configs are made on the fly by prepare_shapes
  # Nothing is downloaded, so no checksums file; TFDS's search for one next to
  # a module inside a package needs importlib_resources (not installed).
  code_path = None

  def _info(self):
    attr = lambda: tfds.features.Tensor(shape=(MAX_SHAPES,), dtype=np.int32)  # noqa: E731
    features = {
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "caption": tfds.features.Text(),
        "num_shapes": tfds.features.Tensor(shape=(), dtype=np.int32),
        "kind": attr(), "colour": attr(), "size": attr(), "position": attr(),
    }
    if self.version.major >= 2:
      features["background"] = tfds.features.Text()
    # Built directly: dataset_info_from_configs needs a package directory.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic images of 1-3 coloured shapes with template captions.",
        features=tfds.features.FeaturesDict(features),
        # Keep generation order so record i == make_split(...)[i].
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    c = self.builder_config
    return {"train": self._generate_examples("train", c.num_train),
            "val": self._generate_examples("val", c.num_val),
            "test": self._generate_examples("test", c.num_test)}

  def _generate_examples(self, split, num_examples):
    c = self.builder_config
    args = (split, c.image_size, c.seed, self.version.major, tuple(c.backgrounds))
    chunks = [(start, min(start + _CHUNK, num_examples), *args)
              for start in range(0, num_examples, _CHUNK)]
    workers = min(os.cpu_count() or 1, len(chunks))
    if workers < 2:
      results = map(_encoded_examples, chunks)
    else:
      # Examples are independent draws: worker processes (spawned, not forked: the
      # parent may hold JAX's threads) draw chunks, in order.
      pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"))
      results = pool.map(_encoded_examples, chunks)
    index = 0
    for examples in results:
      for e in examples:
        yield index, e
        index += 1
    if workers >= 2:
      pool.shutdown()


_CHUNK = 1_000


def _encoded_examples(chunk):
  """Examples [start, stop) of a split as TFDS records (PNG bytes)."""
  start, stop, split, image_size, seed, version, backgrounds = chunk
  out = []
  for i in range(start, stop):
    e = make_example(split, i, image_size, seed, version=version, backgrounds=backgrounds)
    if version < 2:
      del e["background"]
    e["image"] = encode_png(e["image"])
    e["num_shapes"] = np.int32(e["num_shapes"])
    out.append(e)
  return out


class CaptionedShapesV1(CaptionedShapes, skip_registration=True):
  """The v1 renderer's sets (TFDS 1.1.0) under the same name and paths, so those made
  before v2 keep loading and new ones can be made: TFDS builds only a builder's
  own VERSION, hence a builder per version."""
  name = "captioned_shapes"
  VERSION = tfds.core.Version("1.1.0")


class CaptionedShapesV2(CaptionedShapes, skip_registration=True):
  """The v2 sets (TFDS 2.0.0), as CaptionedShapesV1 for 1.1.0."""
  name = "captioned_shapes"
  VERSION = tfds.core.Version("2.0.0")


def prepare_shapes(data_dir, *, image_size, num_train, num_val, num_test, seed=0,
                   version=LATEST_VERSION, backgrounds=shapes_v2.DEFAULT_BACKGROUNDS):
  """Builds the set in `data_dir` ("" = TFDS default) unless already there.

  version: the data version (VERSIONS; 1 = the TFDS 1.1.0 sets made before v2);
  backgrounds: v2's background kinds. Safe to call from several processes on one
  file system at once: a file lock lets one build while the others wait, then
  they all reuse it. Prints the generation time when it builds.

  Returns:
    The CaptionedShapes builder; read with `builder.as_data_source(split)`.
  """
  check_args("train", image_size, 1, MAX_SHAPES)
  if version not in VERSIONS:
    raise ValueError(f"captioned shapes version={version!r} is unknown; use one of {VERSIONS}")
  backgrounds = shapes_v2.check_backgrounds(backgrounds)
  config = ShapesConfig(name=config_name(image_size, num_train, num_val, num_test, seed,
                                         backgrounds if version >= 2 else
                                         shapes_v2.DEFAULT_BACKGROUNDS),
                        image_size=image_size, num_train=num_train, num_val=num_val,
                        num_test=num_test, seed=seed, backgrounds=backgrounds)
  cls = {1: CaptionedShapesV1, 2: CaptionedShapesV2, 3: CaptionedShapes}[version]
  make = lambda: cls(data_dir=data_dir or None, config=config,  # noqa: E731
                     file_format="array_record")
  builder = make()
  if builder.is_prepared():
    return builder
  lock_dir = os.path.dirname(os.fspath(builder.data_path).rstrip("/"))
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not builder.is_prepared():  # another process may have built it meanwhile
        start = time.perf_counter()
        builder.download_and_prepare(file_format="array_record")
        print(f"captioned shapes {tfds_version(version)} {config.name}: generated "
              f"{num_train + num_val + num_test:,} images in {time.perf_counter() - start:.1f} s",
              flush=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  # A fresh builder reads the split sizes from disk, whoever wrote them.
  return make()
