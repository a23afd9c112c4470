"""Place twins: training batches in which where a shape is matters.

On the built-in shapes, a batch's other examples almost never hold the same
shapes as an example, so in-batch contrast (ITC, and ITM's negatives mined
from it) is won on colour, kind and size alone, and both towers learn to
ignore place: a caption and its left <-> right swapped copy had cosine 0.9999,
and most retrieval misses were the same shapes elsewhere (docs/experiments.md, "What
holds R@1"). A twin is an example's shapes (kind, colour, size) moved to
other places, drawn by v2's renderer, with the caption's place phrases moved with
them: in a batch beside its example, it is the negative that only place tells apart.
Twins alone leave both towers blind (neither moves first: each one's gradient
towards place is the other's difference between the twins, near zero); with the
uni-modal views (`config.loss.unimodal`) each tower must tell an example from
its twin by itself, and R@1 rose 0.66 -> 0.86 (docs/experiments.md, "Place").

`TwinSource` holds the twins: records 0 .. N-1 are the training source's, record
N + i is record i's twin. `TwinBatches` turns a sampler of B - p record indices
per step into one of B: its first p indices, each followed by its twin, then the
rest. `config.data.shapes_twins` is the fraction 2p / B of a batch in such pairs.
Each row's "pair_id" (i for record i and its twin) says which rows are twins,
wherever the loader or microbatching puts them (`loss.itm_twin_negatives` reads it).

The twin of image i is a pure function of (seed, i, its record): the places are
drawn from `np.random.default_rng([seed, 0, i, TWIN_STREAM])` (never the example's
own places, no two shapes in one cell), and the image from the stream that drew
image i (`shapes.draw_rng`): its background, sizes, rotations and colours, so
only place tells the two apart. A resumed run sees the same twins.
"""
import re

import numpy as np

from clusjax.config_checks import twin_pairs_per_batch
from clusjax.data import shapes

TWIN_STREAM = 4   # the stream index after the shapes' own (2: v2's drawing, 3: v3's redraws)
_PHRASE = re.compile("|".join(re.escape(p) for p in shapes.POSITION_PHRASES))


def twin_positions(rng, position):
  """Other places for the shapes at `position` (int [n], distinct): distinct, and not
  the same place for every shape."""
  position = np.asarray(position)
  while True:
    moved = rng.permutation(len(shapes.POSITIONS))[:len(position)]
    if (moved != position).any():
      return moved


def move_places(caption, position, moved):
  """`caption` with the place phrase of each shape at `position[j]` replaced by that
  of `moved[j]` (one pass, so two shapes can swap places)."""
  phrase = {shapes.POSITION_PHRASES[int(p)]: shapes.POSITION_PHRASES[int(q)]
            for p, q in zip(position, moved)}
  return _PHRASE.sub(lambda m: phrase.get(m.group(0), m.group(0)), caption)


def make_twin(record, image_index, *, image_size, seed, backgrounds):
  """The twin of a `ShapesSource` training record of image `image_index`: its image
  and caption with the shapes moved. The image is drawn from the stream v2 drew the
  example's own from, so background, sizes, rotations and colours are the same; only
  the places differ."""
  present = np.asarray(record["kind"]) >= 0
  attrs = {k: np.asarray(record[k])[present] for k in ("kind", "colour", "size", "position")}
  moved = twin_positions(np.random.default_rng([seed, 0, image_index, TWIN_STREAM]),
                         attrs["position"])
  image, _ = shapes.draw_v2(shapes.draw_rng(seed, "train", image_index),
                            {**attrs, "position": moved}, image_size, backgrounds)
  position = np.full_like(np.asarray(record["position"]), -1)
  position[:len(moved)] = moved
  return {**record, "image": image, "position": position,
          "caption": move_places(record["caption"], attrs["position"], moved)}


class TwinSource:
  """The training records, then their twins (record N + i: twin of record i)."""

  def __init__(self, source, *, image_size, seed, backgrounds, pair_ids=False):
    self.source, self.num_originals = source, len(source)
    self.pair_ids = pair_ids   # the loader writes each row's "pair_id" (`pair_id`)
    self.image_size, self.seed, self.backgrounds = image_size, seed, tuple(backgrounds)

  def __len__(self):
    return 2 * self.num_originals

  def pair_id(self, index):
    """The pair that record `index` is in: an example and its twin share one, and
    the loader writes it as the batch's "pair_id" (int32 [B])."""
    return int(index) % self.num_originals

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} of {len(self)} (training records and their twins)")
    if index < self.num_originals:
      return self.source[index]
    i = index - self.num_originals
    image_index = i // getattr(self.source, "captions_per_image", 1)
    return make_twin(self.source[i], image_index, image_size=self.image_size, seed=self.seed,
                     backgrounds=self.backgrounds)


class TwinBatches:
  """step -> B record indices of a `TwinSource`: `sampler(step)`'s B - pairs
  indices, the first `pairs` of them each followed by its twin."""

  def __init__(self, sampler, num_originals, pairs):
    self.sampler, self.num_originals, self.pairs = sampler, num_originals, pairs

  def __call__(self, step):
    base = np.asarray(self.sampler(step), np.int64)
    head = base[:self.pairs]
    paired = np.stack([head, head + self.num_originals], axis=1).reshape(-1)
    return np.concatenate([paired, base[self.pairs:]])


def with_twins(source, data_config, batch_size, pair_ids=False):
  """(`TwinSource` of the training `source`, pairs per batch) for `config.data`'s
  shapes_twins, the fraction of a batch's rows in pairs; (`source`, 0) when off or
  when the data is not the built-in shapes (which alone has scenes to move).
  `pair_ids`: batches carry "pair_id" (`clusjax.config.twin_ids_read`)."""
  pairs = twin_pairs_per_batch(data_config, batch_size)
  if not pairs:
    return source, 0
  backgrounds = data_config.get("shapes_backgrounds", shapes.DEFAULT_BACKGROUNDS)
  return TwinSource(source, image_size=data_config.image_size, seed=data_config.seed,
                    backgrounds=backgrounds, pair_ids=pair_ids), pairs
