"""The TFDS builder that the prepared image-text sets share, on two engines.

A subclass says where raw pairs come from (`_items`: a tar shard, a Karpathy
image); this class turns them into ArrayRecord splits:

* one process: `_split_generators` returns Python generators; skips and
  duplicates are counted in `self.stats`;
* Apache Beam (`BeamPairBuilder`, TFDS's own Beam support): the same
  per-item functions run in `beam.FlatMap`s, duplicates are found by a
  `GroupByKey` on the content hash, and the counts are Beam counters read back
  from the pipeline result (`_process_pipeline_result`).

Both keep, of a group of exact duplicates, the item with the smallest key (the
one process reads in key order and keeps the first it sees), and TFDS orders
records by a hash of their key on both engines: the two give the same set in
the same order. The counts go to the set's metadata.json ("stats"), with the
arguments it was built from ("build_args").

Records: image (encoded bytes, a string Tensor: features.Image would need
TensorFlow), caption (Text; a Sequence of Text with several per image), key
(where it came from), content_hash, and any kept JSON fields (Text).
"""
import collections

import numpy as np
import tensorflow_datasets as tfds

STATS_NAMESPACE = "clusjax_prepare"
_VERSION = "1.0.0"


class PairBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the prepared-set builders; `build_args` is a JSON-safe dict."""
  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: "First release."}
  code_path = None     # nothing downloaded: no checksums file to look for
  MULTI_CAPTION = False
  DESCRIPTION = ""

  def __init__(self, *, build_args=None, **kwargs):
    self.build_args = dict(build_args or {})
    self.stats = collections.Counter()
    super().__init__(**kwargs)

  def _info(self):
    text = tfds.features.Text()
    features = {"image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Sequence(text) if self.MULTI_CAPTION else text,
                "key": tfds.features.Text(), "content_hash": tfds.features.Text()}
    features.update({f: tfds.features.Text() for f in self.build_args.get("keep_json", ())})
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(build_args=self.build_args,
                                        all_captions=self.MULTI_CAPTION))

  # -- what a subclass gives --------------------------------------------------

  def _work(self):
    """{split: [work unit]}: what each split is made from (JSON-safe, small)."""
    raise NotImplementedError

  @staticmethod
  def _items(unit, build_args):
    """Yields, for one work unit, (key, record) or a skip reason (str)."""
    raise NotImplementedError

  def _outputs(self, split):
    """The splits that work split `split`'s records go to (`output_of` picks one)."""
    return [split]

  @staticmethod
  def output_of(split, record, build_args):
    """The split (of `_outputs(split)`) that one record of work split `split` goes to."""
    del record, build_args
    return split

  def _generate_examples(self):   # abstract in TFDS; the splits come from _work
    raise NotImplementedError

  # -- one process ------------------------------------------------------------

  def _split_generators(self, dl_manager):
    del dl_manager   # nothing to download
    out = {}
    for split, units in self._work().items():
      first, *others = self._outputs(split)
      # Records of the other outputs wait in memory for their split (TFDS
      # writes the splits one after the other, in this order): keep them small.
      held = {name: [] for name in others}
      out[first] = self._routed(split, units, first, held)
      out.update({name: _held(held, name) for name in others})
    return out

  def _routed(self, split, units, first, held):
    for key, record in self._local_records(split, units):
      name = self.output_of(split, record, self.build_args) if held else first
      if name == first:
        yield key, record
      else:
        held[name].append((key, record))
    held["_done"] = True

  def _local_records(self, split, units):
    seen = set()
    for unit in tfds.core.utils.tqdm(units, desc=f"{self.name} {split}", unit=" inputs",
                                     leave=False):
      for item in self._items(unit, self.build_args):
        if isinstance(item, str):
          self.stats[f"skipped/{item}"] += 1
          continue
        digest = item[1]["content_hash"]
        if digest in seen:
          self.stats["duplicates"] += 1
          continue
        seen.add(digest)
        yield item

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    # Still inside TFDS's incomplete.* folder: metadata.json moves with the rest.
    if self.stats:
      self.info.metadata["stats"] = dict(sorted(self.stats.items()))


class BeamPairBuilder(PairBuilder, skip_registration=True):
  """The same set, built by an Apache Beam pipeline (any runner)."""

  def _split_generators(self, dl_manager, pipeline):   # `pipeline`: TFDS starts Beam mode
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    del dl_manager
    out = {}
    for split, units in self._work().items():
      records = (pipeline
                 | f"{split}/units" >> beam.Create(units)
                 | f"{split}/spread" >> beam.Reshuffle()   # units to workers, not one
                 | f"{split}/read" >> beam.FlatMap(_beam_items, type(self)._items,
                                                   self.build_args)
                 | f"{split}/by_hash" >> beam.Map(lambda kv: (kv[1]["content_hash"], kv))
                 | f"{split}/group" >> beam.GroupByKey()
                 | f"{split}/dedup" >> beam.Map(_first_of_duplicates))
      outputs = self._outputs(split)
      for name in outputs:
        out[name] = records if len(outputs) == 1 else (
            records | f"{split}/to_{name}" >> beam.Filter(_goes_to, type(self).output_of,
                                                          split, name, self.build_args))
    return out

  def _process_pipeline_result(self, pipeline_result):
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top
    query = pipeline_result.metrics().query(MetricsFilter().with_namespace(STATS_NAMESPACE))
    for counter in query["counters"]:
      # committed where the runner has it (Dataflow); the DirectRunner gives attempted.
      value = counter.committed if counter.committed is not None else counter.attempted
      self.stats[counter.key.metric.name] += int(value or 0)
    # Read back in _download_and_prepare, which writes it to metadata.json.


def _counter(name):
  from apache_beam.metrics import Metrics  # pylint: disable=g-import-not-at-top
  return Metrics.counter(STATS_NAMESPACE, name)


def _beam_items(unit, items_fn, build_args):
  """A work unit's (key, record) pairs; its skips become Beam counters."""
  for item in items_fn(unit, build_args):
    if isinstance(item, str):
      _counter(f"skipped/{item}").inc()
    else:
      yield item


def _first_of_duplicates(group):
  """(content hash, [(key, record)]) -> the (key, record) with the smallest key."""
  _, items = group
  items = list(items)
  if len(items) > 1:
    _counter("duplicates").inc(len(items) - 1)
  return min(items, key=lambda kv: kv[0])


def _goes_to(item, output_of, split, name, build_args):
  return output_of(split, item[1], build_args) == name


def _held(held, name):
  """The records `_routed` held back for split `name` (after it has run)."""
  if not held.get("_done"):
    raise AssertionError(f"split {name!r} was generated before the split it is taken from")
  yield from held.pop(name)
