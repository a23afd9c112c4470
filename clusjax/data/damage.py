"""Damaged inputs: what is checked where, and the reasons a record is skipped.

Two places check, by cost:

* When a JSONL source is built (`JsonlLines`): what cannot be a record at
  all, a line that is not a JSON object or lacks a field. The file is parsed
  there anyway, so this costs nothing, and a file that is mostly malformed
  (the wrong file or format) is refused before anything runs.
* When a record is read, in the Grain map (`clusjax.data.pipeline`): its
  content, image bytes and caption text, for every source alike. Opening
  every image at construction would cost a full pass over the images before
  step 0 (minutes for COCO, hours for web-scale sets); in the map the check
  is part of the decode that happens anyway, runs in the decoding threads,
  and a filter after it drops and counts the bad record.

Reasons (metrics.jsonl key `data/skipped/<reason>`):
  at load:  malformed_json (not JSON, not an object), bad_fields (a key missing
            or of the wrong type);
  at read:  missing_image (no such file, unreadable), empty_image (zero bytes),
            truncated_image, undecodable_image (not an image, corrupt data),
            decompression_bomb (more pixels than PIL.Image.MAX_IMAGE_PIXELS),
            bad_image_array, empty_caption (empty or whitespace),
            binary_caption (control characters, bytes that are not UTF-8),
            read_error (the source raised).
Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB.
"""
import collections
import io
import json
import logging
import os
import re
import threading

import numpy as np
import PIL.Image

from clusjax.config import ConfigError

# Lines of a JSONL file that may be malformed before it is refused: a few bad
# lines are damage (a torn last line, a bad byte) and are skipped; more look
# like the wrong file or format, where the first bad line is the useful answer.
MAX_MALFORMED_FRACTION = 0.1

# C0/C1 control characters (tab and newlines allowed), lone surrogates and the
# replacement character (bytes that were not UTF-8).
_BINARY = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ConfigError):
  """A data set with no usable record, or one too malformed to read.

  A ConfigError so that launch/main.py prints it as one line and exits, as for
  a bad config value: the data set is what config.data names.
  """


def caption_problem(caption):
  """None for a usable caption, else the reason: "empty_caption" / "binary_caption" /
  "bad_fields" (not a string)."""
  if caption is None or (isinstance(caption, str) and not caption.strip()):
    return "empty_caption"
  if not isinstance(caption, str):
    return "bad_fields"
  if _BINARY.search(caption):
    return "binary_caption"
  return None


class JsonlLines:
  """Iterates a JSONL file's lines as (where "file:line", dict), skipping damaged ones.

  Lines that are not a JSON object, or lack a key of `required`, are skipped
  and counted in `skipped` (reason -> count); callers `skip` lines whose
  fields they find wrong (read with `text`, `image_path`). After the last
  line, raises DataError naming the first malformed line when more than
  MAX_MALFORMED_FRACTION of the lines are malformed; `done` raises when no
  record is left at all.
  """

  def __init__(self, path, required=(), hint=""):
    self.path = os.fspath(path)
    self.folder = os.path.dirname(os.path.abspath(self.path))
    self.required, self.hint = tuple(required), hint
    self.skipped = collections.Counter()
    self.lines = 0
    self._first = {}    # reason -> message of its first skipped line

  def skip(self, reason, where, message):
    self.skipped[reason] += 1
    self._first.setdefault(reason, message if message.startswith(where) else
                           f"{where}: {message}")

  @staticmethod
  def text(value, key, where):
    """A caption / question field as str. Lone surrogates (bytes that were not
    UTF-8, or "\\udXXX" escapes) become U+FFFD, which the pipeline skips as a
    binary caption, so that every caption encodes (the tokenizer trainer reads them)."""
    if not isinstance(value, str):
      raise ValueError(f"{where}: \"{key}\" is {json.dumps(value)[:80]}, not a string")
    return _SURROGATE.sub("\ufffd", value)

  def image_path(self, entry, key, where):
    """entry[key] as a path (relative to the JSONL's folder, or absolute)."""
    value = entry[key]
    if not isinstance(value, str) or not value.strip():
      raise ValueError(f"{where}: \"{key}\" must be a file path, got {json.dumps(value)[:80]}")
    return os.path.join(self.folder, os.path.expanduser(value))

  def __iter__(self):
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"JSONL file {self.path!r} does not exist")
    with open(self.path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        # surrogateescape: bytes that are not UTF-8 survive as lone surrogates,
        # so a binary caption is skipped (as U+FFFD, `text`) and a path still opens.
        line = raw.decode("utf-8", "surrogateescape")
        if line_no == 1:
          line = line.lstrip("\ufeff")   # a byte-order mark some editors write
        if not line.strip():
          continue
        self.lines += 1
        where = f"{self.path}:{line_no}"
        try:
          entry = json.loads(line)
        except json.JSONDecodeError as e:
          self.skip("malformed_json", where,
                    f"{where}: malformed JSON ({e.msg}): {line.strip()[:80]!r}")
          continue
        if not isinstance(entry, dict):
          self.skip("malformed_json", where,
                    f"{where}: expected a JSON object, got {type(entry).__name__}")
          continue
        missing = [k for k in self.required if k not in entry]
        if missing:
          self.skip("bad_fields", where,
                    f"{where}: missing key(s) {missing}; each line needs {self.hint}")
          continue
        yield where, entry
    malformed = self.skipped["malformed_json"] + self.skipped["bad_fields"]
    if malformed > MAX_MALFORMED_FRACTION * self.lines:
      first = self._first.get("malformed_json") or self._first["bad_fields"]
      raise DataError(f"{first} ({malformed} of {self.lines} lines malformed, over "
                      f"{MAX_MALFORMED_FRACTION:.0%}: the wrong file or format? fix or drop them)")

  def done(self, num_records):
    """The skip counts, once every line is read; logs them, raises if nothing is usable."""
    if self.skipped:
      first = next(iter(self._first.values()))
      if not num_records:
        raise DataError(f"{self.path}: no usable record, every line was skipped "
                        f"({describe(self.skipped)}); first: {first}")
      logging.warning("%s: skipped %s of %d lines (first: %s)", self.path,
                      describe(self.skipped), self.lines, first)
    return dict(self.skipped)


# ---------------------------------------------------------------------------
# Images.


def _to_rgb(pil):
  """Any PIL mode -> RGB; 16- and 32-bit integer grayscale scaled to 8 bits
  (PIL's convert("RGB") clips them at 255, turning a 16-bit image white)."""
  if pil.mode == "I" or pil.mode.startswith("I;16"):
    gray = np.clip(np.asarray(pil).astype(np.int64), 0, 65535) // 257
    return PIL.Image.fromarray(gray.astype(np.uint8), "L").convert("RGB")
  return pil.convert("RGB")


def decode_image_bytes(data):
  """Encoded image bytes -> (PIL RGB image, None) or (None, (reason, detail)).

  A decompression bomb is refused from the header, before any pixel is
  decoded: PIL raises above 2x MAX_IMAGE_PIXELS and only warns between 1x and
  2x, where decoding would still take up to 0.5 GB per decoding thread.
  """
  if data is None:
    return None, ("missing_image", "file missing or unreadable")
  if not len(data):
    return None, ("empty_image", "zero-byte image file")
  what = lambda e: f"{type(e).__name__}: {e}"
  try:
    pil = PIL.Image.open(io.BytesIO(data))
  # The warning too, where warnings are errors (-W error, pytest's filterwarnings).
  except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
    return None, ("decompression_bomb", what(e))
  except Exception as e:  # noqa: BLE001 - any undecodable file is a bad record
    return None, ("truncated_image" if "truncat" in str(e).lower() else "undecodable_image",
                  what(e))
  with pil:
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit and pil.width * pil.height > limit:
      return None, ("decompression_bomb", f"{pil.width}x{pil.height} pixels, over "
                                          f"PIL.Image.MAX_IMAGE_PIXELS={limit}")
    try:
      pil.load()
      return _to_rgb(pil), None
    except Exception as e:  # noqa: BLE001
      truncated = isinstance(e, EOFError) or "truncat" in str(e).lower()
      return None, ("truncated_image" if truncated else "undecodable_image", what(e))


# ---------------------------------------------------------------------------
# Counting what the pipelines skip.


def describe(counts):
  """{reason: n} -> "n reason, ..."."""
  return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


class _SkipCounter:
  """Process-wide counts of skipped records by reason; thread-safe (Grain maps in threads)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.by_reason = collections.Counter()

  @property
  def count(self):
    return sum(self.by_reason.values())

  def add(self, index, reason, detail=""):
    with self._lock:
      self.by_reason[reason] += 1
      count = sum(self.by_reason.values())
    if count == 1:
      logging.warning("Skipping bad record %d: %s: %s (further ones are counted by reason, "
                      "data/skipped/<reason> in metrics.jsonl)", index, reason, detail)
    elif count in (10, 100, 1000, 10_000, 100_000):
      logging.warning("%d bad records skipped so far (%s; latest: record %d: %s: %s)", count,
                      describe(self.by_reason), index, reason, detail)


SKIPPED = _SkipCounter()


def skipped_records():
  """How many bad records this process has skipped (all pipelines, all epochs)."""
  return SKIPPED.count


def skipped_by_reason():
  """{reason: count} of the records this process's pipelines skipped when reading."""
  with SKIPPED._lock:  # pylint: disable=protected-access
    return dict(SKIPPED.by_reason)


def reset_skipped_records():
  with SKIPPED._lock:  # pylint: disable=protected-access
    SKIPPED.by_reason.clear()


def skip_metrics(source=None):
  """{"data/skipped/<reason>": count} for metrics.jsonl: the records `source`
  skipped when it was built (its `skipped`, as JSONL sources have) plus those
  this process skipped when reading (so on several hosts, process 0's share)."""
  counts = collections.Counter(getattr(source, "skipped", None) or {})
  counts.update(skipped_by_reason())
  return {f"data/skipped/{reason}": n for reason, n in sorted(counts.items())}
