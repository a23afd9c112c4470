"""Grain pipelines: records -> decoded, tokenized, batched numpy arrays.

Train: the source's indices shuffled, repeated forever (Grain reshuffles
every epoch: epoch e uses shuffle seed `h(seed) + e`), cut into global
batches of which each process reads its rows (or global batches a sampler
picks, `make_sampled_iterator`), decoded in threads (or worker processes),
bad records dropped and counted, batched. The iterator's `get_state()` is a small
JSON-safe dict, so `grain.checkpoint.CheckpointSave` stores it in an Orbax
checkpoint and a resumed run sees exactly the batches it would have seen.

Eval: the first N records in order, the last batch padded, with `valid`.

Bad records (image missing, empty, truncated or a decompression bomb; empty
or binary caption; wrong array shape; a source that raises) never crash a
run: they are skipped and counted per process by reason (`skipped_by_reason()`,
reasons in `clusjax.data.damage`), with the first one logged; a data set with
no usable record stops with a DataError. One record is decoded by
`clusjax.data.decoding`.
"""
import collections
import os

import grain
import numpy as np

from clusjax.data.damage import SKIPPED as _SKIPPED
from clusjax.data.damage import DataError
from clusjax.data.damage import describe as _describe
# Re-exported: clusjax.data and the train loop read the counts from here.
from clusjax.data.damage import (reset_skipped_records, skip_metrics,  # noqa: F401
                                 skipped_by_reason, skipped_records)
from clusjax.data.decoding import clip_caption, decode_or_reason
from clusjax.data.negatives import negative_caption
from clusjax.data.sampler import SampledIndex
from clusjax.data.twins import TwinBatches

# Decoding threads: more than the cores only contend with the train step
# (2-core CPU, batch 128 of 64 px: 124 ms of CPU per batch with 16 threads,
# 80 ms with one).
READ_THREADS = min(16, os.cpu_count() or 1)

# ---------------------------------------------------------------------------
# Reading records (bad ones are counted by clusjax.data.damage's SKIPPED).


class _DecodeIndex:
  """index -> decoded example, or a {"bad": ...} marker (counted later).

  Bad records become markers rather than None so that they are counted in
  the main process even when decoding runs in Grain worker processes.
  Picklable (plain attributes) for those workers.
  """

  def __init__(self, source, image_size, tokenizer, max_text_len, keep_caption=False,
               negative_groups=(), seed=0, prompt_labeler=None, tagger=None, targets=None):
    self.source, self.image_size = source, image_size
    self.tokenizer, self.max_text_len = tokenizer, max_text_len
    self.keep_caption = keep_caption
    self.targets = targets
    self.negative_groups, self.seed = negative_groups, seed
    self.prompt_labeler, self.tagger = prompt_labeler, tagger

  def __call__(self, index):
    index = int(index)
    try:
      record = self.source[index]
      example, reason = decode_or_reason(record, self.image_size, self.tokenizer,
                                        self.max_text_len)
    except Exception as e:  # noqa: BLE001 - a failing read is a bad record, not a crash
      example, reason = None, ("read_error", f"{type(e).__name__}: {e}")
    if example is None:
      return {"bad_index": index, "bad_reason": reason[0], "bad_detail": reason[1]}
    caption = clip_caption(record["caption"], self.max_text_len)   # for the texts made from it
    if self.keep_caption:   # eval: the text and what the evaluators group by
      example.update({k: record[k] for k in ("caption",) + EVAL_KEYS if k in record})
    if self.targets is not None:   # a downstream task's labels (clusjax.data.tasks)
      example.update(self.targets(record))
    if getattr(self.source, "pair_ids", False):   # place twins (clusjax.data.twins)
      example["pair_id"] = np.int32(self.source.pair_id(index))
    if self.negative_groups:
      # None: nothing to swap (an all-padding row, masked out of the loss).
      negative = negative_caption(caption, self.negative_groups, self.seed, index)
      ids, mask = self._encode_or_pad(negative, self.max_text_len)
      example.update(neg_text_ids=ids, neg_text_mask=mask, neg_valid=negative is not None)
    if self.prompt_labeler is not None:
      example.update(self._labels(caption, index))
    if self.tagger is not None:
      ids, mask = self._encode_or_pad(self.tagger(caption), self.max_text_len)
      example.update(tag_ids=ids, tag_mask=mask)
    return example

  def _encode_or_pad(self, text, length):
    """text -> (ids [length], mask [length]); None or "" -> an all-padding row
    (mask all False), which the losses mask out."""
    if not text:
      return np.full(length, self.tokenizer.pad_id, np.int32), np.zeros(length, bool)
    return self.tokenizer.encode_one(text, length)

  def _labels(self, caption, index):
    # "" = the caption has fewer nouns than labels.
    texts, label_noun, caption_nouns = self.prompt_labeler(caption, index)
    rows = [self._encode_or_pad(t, self.prompt_labeler.max_text_len) for t in texts]
    return dict(label_ids=np.stack([r[0] for r in rows]),
                label_mask=np.stack([r[1] for r in rows]),
                label_noun=label_noun, caption_nouns=caption_nouns)


# Record keys that `iterate_eval` passes through to the evaluators.
EVAL_KEYS = ("image_id", "question_type", "statement_type", "answers")


# Bad records in a row after which a data set counts as unusable. Train streams
# are shuffled, so 10,000 in a row means under 0.1% of the records are good
# (else a chance of e^-10): stopping beats spinning through an epoch of a
# million missing files. Smaller sets: one epoch's worth (`limit`).
BAD_IN_A_ROW = 10_000


class _DropBad:
  """Filter: True for good examples; counts the bad ones.

  Raises DataError once min(limit, BAD_IN_A_ROW) records in a row were bad (a
  filter would otherwise spin forever on a data set with no usable record).
  """

  def __init__(self, limit):
    self.size, self.limit = limit, min(limit, BAD_IN_A_ROW)
    self.in_a_row = 0
    self.reasons = collections.Counter()   # of the current run of bad records

  def __call__(self, example):
    if "bad_index" not in example:
      if self.in_a_row:
        self.in_a_row = 0
        self.reasons.clear()
      return True
    _SKIPPED.add(example["bad_index"], example["bad_reason"], example["bad_detail"])
    self.in_a_row += 1
    self.reasons[example["bad_reason"]] += 1
    if self.in_a_row >= self.limit:
      raise DataError(
          f"no usable record: {self.in_a_row} records in a row were bad "
          f"({_describe(self.reasons)}; the data set has {self.size}); last: record "
          f"{example['bad_index']}: {example['bad_reason']}: {example['bad_detail']}; "
          "check the image files the data set names")
    return False


# ---------------------------------------------------------------------------
# Pipelines.


def make_train_iterator(source, *, global_batch_size, seed, image_size, tokenizer, max_text_len,
                        process_index=0, process_count=1, num_workers=0, negative_groups=(),
                        prompt_labeler=None, tagger=None, targets=None, twin_pairs=0):
  """Infinite, shuffled, per-process batches of `source`.

  One shuffled stream of all records, the same in every process; global
  batch s is its records [s * B, (s + 1) * B) and process p reads rows
  [p * b, (p + 1) * b) of it, so the global batches (and the losses) do not
  depend on process_count.

  Returns:
    A grain DatasetIterator over {"image": uint8 [b, S, S, 3], "text_ids":
    int32 [b, L], "text_mask": bool [b, L]}, b = global_batch_size //
    process_count; get_state()/set_state() restore the position exactly.
    With `negative_groups` (word groups, `clusjax.data.negatives`) also each
    caption's hard negative: "neg_text_ids" [b, L], "neg_text_mask" [b, L]
    and "neg_valid" bool [b] (False where the caption has no word to swap).
    With `prompt_labeler` (`clusjax.data.prompts.PromptLabeler`, k nouns)
    also the prompt-template labels: "label_ids" / "label_mask" [b, k,
    labeler.max_text_len], "label_noun" int32 [b, k] (0 = no label) and
    "caption_nouns" int32 [b, max_nouns]. With `tagger` (caption -> text,
    `clusjax.data.prompts.caption_tags`) also "tag_ids" / "tag_mask" [b, L].
    With `targets` (record -> dict of arrays, `clusjax.data.tasks`) also those,
    batched; records with "image2" (NLVR2) also "image2" [b, S, S, 3].
    With `twin_pairs` p > 0 (`source` a `clusjax.data.twins.TwinSource`) the
    stream shuffles the training records alone and each global batch is B - p
    of them, the first p each followed by its twin; "pair_id" int32 [b] is the
    same for an example and its twin, different otherwise.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of "
                     f"processes ({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  local_batch = global_batch_size // process_count
  if len(source) == 0 or local_batch == 0:
    raise ValueError(f"{len(source)} records and global batch size {global_batch_size} give "
                     f"nothing to read for each of {process_count} processes")
  # shuffle before repeat: each epoch is a full permutation of the records, and
  # Grain seeds epoch e's permutation with (shuffle seed + e), so epochs
  # differ. Hashing the seed keeps run seed=1 from replaying seed=0's epoch 2.
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  num_records = source.num_originals if twin_pairs else len(source)
  stream = grain.MapDataset.range(num_records).shuffle(seed=shuffle_seed).repeat(None)
  batches = _StreamBatches(stream, global_batch_size - twin_pairs)
  if twin_pairs:
    batches = TwinBatches(batches, num_records, twin_pairs)
  return make_sampled_iterator(
      source, batches, global_batch_size=global_batch_size,
      seed=seed, image_size=image_size, tokenizer=tokenizer, max_text_len=max_text_len,
      process_index=process_index, process_count=process_count, num_workers=num_workers,
      negative_groups=negative_groups, prompt_labeler=prompt_labeler, tagger=tagger,
      targets=targets)


class _StreamBatches:
  """step -> global batch `step` (record indices [batch_size]) of an index stream."""

  def __init__(self, stream, batch_size):
    self.stream, self.batch_size = stream, batch_size

  def __call__(self, step):
    start = step * self.batch_size
    return [self.stream[i] for i in range(start, start + self.batch_size)]


def make_sampled_iterator(source, sampler, *, global_batch_size, seed, image_size, tokenizer,
                          max_text_len, process_index=0, process_count=1, num_workers=0,
                          negative_groups=(), prompt_labeler=None, tagger=None, targets=None):
  """Batches whose records a sampler picks (`clusjax.data.sampler`).

  `sampler(step)` gives global batch `step` (record indices, the same on
  every process); this process reads its slice, rows [process_index * b,
  (process_index + 1) * b), b = global_batch_size // process_count. Batches
  and iterator state are as `make_train_iterator`'s (a bad record is dropped
  and the next position fills its place).
  """
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the number of "
                     f"processes ({process_count})")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.range(_SAMPLED_POSITIONS).map(
      SampledIndex(sampler, local_batch, process_index))
  decode = _DecodeIndex(source, image_size, tokenizer, max_text_len,
                        negative_groups=negative_groups, seed=seed,
                        prompt_labeler=prompt_labeler, tagger=tagger, targets=targets)
  return _decoded_batches(ds, decode, local_batch, num_workers, bad_limit=len(source))


# Positions of a sampled stream: far more steps than any run takes.
_SAMPLED_POSITIONS = 2 ** 40


# Consecutive positions that a Grain worker process decodes per element (`_DecodeChunk`).
WORKER_CHUNK = 32


class _DecodeChunk:
  """chunk c -> the decoded examples of positions [c * size, (c + 1) * size), their
  arrays stacked: {"examples": {key: array [n_good, ...]}, "slots": [None (the next
  good example) or a bad-record marker, per position]}.

  Grain's `mp_prefetch` moves every array of an element through its own shared-memory
  segment; one segment per key per chunk instead of per example is what lets worker
  processes add throughput (benchmarks/RESULTS.md, "Workers").
  """

  def __init__(self, indices, decode, size):
    self.indices, self.decode, self.size = indices, decode, size

  def __call__(self, chunk):
    out = [self.decode(self.indices[int(chunk) * self.size + j]) for j in range(self.size)]
    good = [e for e in out if "bad_index" not in e]
    stacked = {k: np.stack([np.asarray(e[k]) for e in good]) for k in good[0]} if good else {}
    return {"examples": stacked, "slots": [e if "bad_index" in e else None for e in out]}


class _Unchunk(grain.experimental.FlatMapTransform):
  """`_DecodeChunk`'s output -> its examples in position order (bad-record markers kept)."""
  max_fan_out = WORKER_CHUNK

  def flat_map(self, element):
    examples, good = [], 0
    for slot in element["slots"]:
      if slot is None:
        examples.append({k: v[good] for k, v in element["examples"].items()})
        good += 1
      else:
        examples.append(slot)
    return examples


def _decoded_batches(indices, decode, local_batch, num_workers, *, bad_limit):
  """Grain MapDataset of record indices -> iterator of decoded batches, bad records dropped.

  With worker processes, each decodes chunks of WORKER_CHUNK consecutive positions
  (`_DecodeChunk`) and the main process splits them back: the same examples in the
  same order, so the batches (and the iterator state) do not depend on num_workers.
  """
  # Enough read-ahead for about two batches; Grain's default (500) wastes work
  # when a test or an eval drops the iterator early.
  ahead = min(max(2 * local_batch, 64), 4096)
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags; a library caller may not parse
    chunks = grain.MapDataset.range(len(indices) // WORKER_CHUNK).map(
        _DecodeChunk(indices, decode, WORKER_CHUNK))
    per_worker = max(1, ahead // (WORKER_CHUNK * num_workers))
    it = chunks.to_iter_dataset(grain.ReadOptions(num_threads=min(READ_THREADS, per_worker),
                                                  prefetch_buffer_size=per_worker))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=per_worker))
    it = grain.experimental.FlatMapIterDataset(it, _Unchunk())
  else:
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=ahead)
    it = indices.map(decode).to_iter_dataset(read)
  it = it.filter(_DropBad(limit=bad_limit)).batch(local_batch, drop_remainder=True)
  return iter(it)


def _pad_batch(examples, batch_size, image_size, max_text_len, pad_id):
  """list of decoded examples (<= batch_size) -> one padded batch with `valid` [b].

  Array keys are stacked and padded with zeros (text with `pad_id`); the other
  keys (caption, EVAL_KEYS) become lists padded with "" / None.
  """
  n = len(examples)
  batch = {"image": np.zeros((batch_size, image_size, image_size, 3), np.uint8),
           "text_ids": np.full((batch_size, max_text_len), pad_id, np.int32),
           "text_mask": np.zeros((batch_size, max_text_len), bool),
           "valid": np.arange(batch_size) < n}
  for key in examples[0] if n else ():
    values = [e[key] for e in examples]
    if isinstance(values[0], (np.ndarray, np.generic, int, float)):   # bool is an int
      stacked = np.stack([np.asarray(v) for v in values])
      if key not in batch:
        batch[key] = np.zeros((batch_size,) + stacked.shape[1:], stacked.dtype)
      batch[key][:n] = stacked
    else:
      batch[key] = values + [("" if key == "caption" else None)] * (batch_size - n)
  batch.setdefault("caption", [""] * batch_size)
  return batch


def iterate_eval(source, *, batch_size, image_size, tokenizer, max_text_len, num_examples=None,
                 targets=None):
  """Batches of the first `num_examples` records (all if None), in order.

  Bad records are skipped (and counted), so a batch holds the next good
  records. Decoding runs in threads; order is kept.

  Yields:
    {"image": uint8 [b, S, S, 3], "text_ids": int32 [b, L], "text_mask":
    bool [b, L], "valid": bool [b] (False on padding), "caption": list[str]
    (b, "" on padding)}, b = batch_size; only the last batch has padding.
    Also the records' EVAL_KEYS (lists, None on padding), "image2" where the
    records have it, and the arrays of `targets` (as in `make_train_iterator`).
  """
  n = len(source) if num_examples is None else min(num_examples, len(source))
  if n == 0:
    return
  ds = grain.MapDataset.range(n).map(
      _DecodeIndex(source, image_size, tokenizer, max_text_len, keep_caption=True,
                   targets=targets))
  read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=max(2 * batch_size, 64))
  pending, good, bad = [], 0, collections.Counter()
  for example in ds.to_iter_dataset(read):
    if "bad_index" in example:
      _SKIPPED.add(example["bad_index"], example["bad_reason"], example["bad_detail"])
      bad[example["bad_reason"]] += 1
      if not good and sum(bad.values()) == n:
        raise DataError(f"no usable record: all {n} records to evaluate were bad "
                        f"({_describe(bad)}); last: record {example['bad_index']}: "
                        f"{example['bad_detail']}")
      continue
    good += 1
    pending.append(example)
    if len(pending) == batch_size:
      yield _pad_batch(pending, batch_size, image_size, max_text_len, tokenizer.pad_id)
      pending = []
  if pending:
    yield _pad_batch(pending, batch_size, image_size, max_text_len, tokenizer.pad_id)
